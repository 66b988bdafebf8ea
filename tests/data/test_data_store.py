"""The dataset store: layout, OME-Zarr 0.5 validity, region reads, the class-location index."""

import pickle

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import Image, ImageLabel, Labels

from iunet3d.data import DataError, StorageOptions, open_dataset
from iunet3d.data.class_locations import sample_class_locations
from iunet3d.data.storage import chunk_shape
from tests.helpers.data import random_ct, store_case

SHAPE = (37, 70, 65)
SMALL_CHUNKS = StorageOptions(chunk=16, coarse_chunk=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "ds"
    image, label = random_ct(SHAPE)
    store_case(root, "case_a", image, label, options=SMALL_CHUNKS)
    return root, image, label


def padded_reference(volume, start, size, pad):
    """Region [start, start + size) of ``volume`` padded with ``pad``, by plain numpy."""
    margin = (
        max(max(-s, 0) for s in start),
        max(max(s + n - d, 0) for s, n, d in zip(start, size, volume.shape, strict=True)),
    )
    width = max(margin) + 1
    big = np.pad(volume, width, constant_values=pad)
    index = tuple(slice(s + width, s + width + n) for s, n in zip(start, size, strict=True))
    return big[index]


REGIONS = [
    ((0, 0, 0), SHAPE),  # the whole volume
    ((8, 16, 32), (8, 16, 16)),  # chunk-aligned
    ((3, 5, 7), (11, 29, 13)),  # unaligned
    ((-4, -9, 60), (10, 20, 12)),  # over three borders
    ((30, 60, -5), (20, 20, 20)),  # past the far end
    ((-3, -3, -3), (43, 76, 71)),  # larger than the volume
    ((100, 0, 0), (4, 4, 4)),  # entirely outside
]


@pytest.mark.parametrize(("start", "size"), REGIONS)
def test_region_reads_equal_slicing_of_the_padded_volume(dataset, start, size):
    root, image, label = dataset
    case = open_dataset(root).case("case_a")
    got_image = case.read_image(start, size)
    assert got_image.dtype == np.int16 and got_image.shape == tuple(size)
    np.testing.assert_array_equal(got_image, padded_reference(image, start, size, -1024))
    np.testing.assert_array_equal(
        case.read_image(start, size, pad_value=-2000), padded_reference(image, start, size, -2000)
    )
    np.testing.assert_array_equal(case.read_label(start, size), padded_reference(label, start, size, 0))
    np.testing.assert_array_equal(
        case.read_label(start, size, pad_value=255), padded_reference(label, start, size, 255)
    )


def _chunk_files(array_dir):
    return {
        tuple(int(p) for p in f.relative_to(array_dir / "c").parts): f
        for f in (array_dir / "c").rglob("*")
        if f.is_file()
    }


def test_a_region_read_touches_only_the_chunks_it_overlaps(tmp_path):
    """Every chunk outside the region is overwritten with garbage: the read must still succeed."""
    image, label = random_ct(SHAPE, seed=1)
    store_case(tmp_path / "ds", "c", image, label, options=SMALL_CHUNKS)
    case = open_dataset(tmp_path / "ds").case("c")
    chunks = case.image_array.chunks
    start, size = (-2, 20, 33), (12, 13, 40)
    needed = [
        range(max(s, 0) // c, (min(s + n, d) - 1) // c + 1)
        for s, n, d, c in zip(start, size, SHAPE, chunks, strict=True)
    ]
    files = _chunk_files(tmp_path / "ds" / "c" / "0")
    outside = [f for key, f in files.items() if not all(k in r for k, r in zip(key, needed, strict=True))]
    assert 0 < len(outside) < len(files)
    for f in outside:
        f.write_bytes(b"not a blosc chunk")
    np.testing.assert_array_equal(case.read_image(start, size), padded_reference(image, start, size, -1024))
    with pytest.raises(DataError, match=r"case c: reading the image region .* may be corrupted"):
        case.read_image((0, 0, 0), (8, 8, 8))


def test_chunks_are_smaller_along_the_coarse_axis():
    options = StorageOptions()
    assert chunk_shape((320, 512, 512), (2.5, 0.8, 0.8), options) == (32, 64, 64)
    assert chunk_shape((320, 512, 512), (1.0, 1.0, 1.0), options) == (64, 64, 64)
    assert chunk_shape((20, 512, 40), (2.5, 0.8, 0.8), options) == (20, 64, 40)  # never larger than the volume
    assert chunk_shape((100, 100, 100), (0.7, 0.7, 2.5), options) == (64, 64, 32)


def test_bad_storage_options_are_named():
    with pytest.raises(DataError, match="storage codec"):
        StorageOptions(codec="gzip")
    with pytest.raises(DataError, match="storage coarse_chunk"):
        StorageOptions(coarse_chunk=0)
    with pytest.raises(DataError, match="storage level"):
        StorageOptions(level=11)


def test_case_is_a_valid_ome_zarr_0_5_image_with_labels(dataset):
    root, image, _ = dataset
    group = zarr.open_group(root / "case_a", mode="r")
    model = Image.from_zarr(group)
    (multiscale,) = model.attributes.ome.multiscales
    assert [axis.name for axis in multiscale.axes] == ["z", "y", "x"]
    assert {axis.unit for axis in multiscale.axes} == {"millimeter"}
    scale, translation = multiscale.datasets[0].coordinateTransformations
    assert scale.scale == [2.5, 0.8, 0.8] and translation.translation == [0.0, 0.0, 0.0]
    assert Labels.from_zarr(group["labels"]).attributes.ome.labels == ["segmentation"]
    label_model = ImageLabel.from_zarr(group["labels/segmentation"])
    assert [p.label_value for p in label_model.attributes.ome.image_label.properties] == [1, 2, 3]
    array = group["0"]
    assert array.dtype == np.int16 and array.shape == SHAPE
    assert array.compressors[0].cname.value == "lz4" and array.compressors[0].shuffle.value == "shuffle"
    assert group["labels/segmentation/0"].dtype == np.uint8


def test_root_holds_classes_cases_and_foreground_statistics(dataset):
    root, image, label = dataset
    ds = open_dataset(root)
    assert ds.class_names == ["background", "a", "b", "c"] and ds.num_classes == 4 and ds.case_names == ["case_a"]
    assert ds.info["cases"][0] == {
        "name": "case_a",
        "shape": list(SHAPE),
        "spacing": [2.5, 0.8, 0.8],
        "labels": ["segmentation"],
    }
    assert ds.statistics["spacing"]["median"] == [2.5, 0.8, 0.8]
    foreground = image[label > 0].astype(np.float64)
    stats = ds.statistics["foreground_intensity"]
    assert stats["samples"] == min(foreground.size, 10_000)
    assert abs(stats["mean"] - foreground.mean()) < 4 * foreground.std() / np.sqrt(stats["samples"])
    assert abs(stats["std"] - foreground.std()) < 0.05 * foreground.std()


def test_class_locations_sample_each_class_uniformly(dataset):
    root, _, label = dataset
    case = open_dataset(root).case("case_a")
    counts = np.bincount(label.ravel(), minlength=4)
    assert case.class_voxel_counts() == {v: int(counts[v]) for v in (1, 2, 3)}
    for value in (1, 2, 3):
        positions = case.class_locations(value)
        assert positions.dtype == np.int32 and positions.shape == (min(counts[value], 10_000), 3)
        assert (label[tuple(positions.T)] == value).all()
        assert len(np.unique(positions, axis=0)) == len(positions)  # without replacement
    assert case.class_locations(7).shape == (0, 3)


def test_class_location_sampling_is_uniform_across_slabs():
    """More voxels than the budget: the sample's z distribution follows the class's."""
    label = np.zeros((128, 40, 40), dtype=np.uint8)
    label[:96, :, :20] = 1  # 76800 voxels over three slabs
    label[96:, :5, :5] = 1  # few voxels in the last slab
    positions, counts = sample_class_locations(label, np.random.default_rng(0), max_per_class=5000)
    assert counts == {1: int((label == 1).sum())}
    z = positions[1][:, 0]
    expected_last = 5000 * (32 * 25) / counts[1]
    assert abs((z >= 96).sum() - expected_last) < 4 * np.sqrt(expected_last)
    assert abs(np.mean(z[z < 96]) - 47.5) < 2.0


def test_pad_values_the_voxel_type_cannot_hold_are_refused(dataset):
    case = open_dataset(dataset[0]).case("case_a")
    for read, value in (
        (case.read_label, -1),
        (case.read_label, 300),
        (case.read_image, 40000),
        (case.read_image, 0.5),
    ):
        with pytest.raises(DataError, match=f"pad_value {value!r}: expected an integer"):
            read((-2, 0, 0), (4, 4, 4), pad_value=value)


def test_cases_pickle_for_dataloader_workers(dataset):
    root, image, _ = dataset
    case = pickle.loads(pickle.dumps(open_dataset(root).case("case_a")))
    np.testing.assert_array_equal(case.read_image((0, 0, 0), (4, 5, 6)), image[:4, :5, :6])


def test_affine_maps_indices_to_physical_millimetres(dataset):
    root, _, _ = dataset
    affine = open_dataset(root).case("case_a").affine
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [3 * 0.8, 2 * 0.8, 1 * 2.5, 1])


def test_opening_what_is_not_a_dataset_or_case_says_so(tmp_path, dataset):
    with pytest.raises(DataError, match="no such dataset directory"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not an iunet3d dataset"):
        open_dataset(tmp_path / "plain")
    root, _, _ = dataset
    with pytest.raises(DataError, match=r"no case 'nope'; cases: case_a"):
        open_dataset(root).case("nope")
    with pytest.raises(DataError, match="no label 'organs'; it has segmentation"):
        open_dataset(root).case("case_a").read_label((0, 0, 0), (2, 2, 2), name="organs")
