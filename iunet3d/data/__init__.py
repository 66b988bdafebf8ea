"""CT volumes in Zarr: the dataset store, conversion from medical image files, synthetic CT, region reads."""

from iunet3d.data.convert import CaseJob, ConversionReport, pair_case_files, run_conversion
from iunet3d.data.dataset import CTCase, CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.export import export_case
from iunet3d.data.storage import StorageOptions

__all__ = [
    "CTCase",
    "CTDataset",
    "CaseJob",
    "ConversionReport",
    "DataError",
    "StorageOptions",
    "export_case",
    "open_dataset",
    "pair_case_files",
    "run_conversion",
]
