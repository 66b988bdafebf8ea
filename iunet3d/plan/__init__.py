"""Planning a training configuration from a dataset and a memory budget (``iunet3d plan``)."""
