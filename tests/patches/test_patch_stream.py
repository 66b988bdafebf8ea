"""PatchStream: sharding across ranks and workers, determinism, exact resume, sampling, borders, errors."""

from __future__ import annotations

import multiprocessing
import warnings

import numpy as np
import pytest
import torch

from iunet3d.data import CTNormalization, DataError, open_dataset
from iunet3d.data.synth import SYNTH_CLASS_NAMES, make_phantom
from iunet3d.patches import (
    AugmentationConfig,
    PatchLoader,
    PatchStream,
    ValidationPatches,
    split_cases,
    validation_loader,
)
from tests.helpers.data import store_case

SPACING = (2.5, 0.8, 0.8)
PATCH = (8, 32, 40)  # anisotropic on purpose
WINDOW = CTNormalization.window(-1000, 1000)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Four labelled phantoms of different shapes (z, y, x)."""
    path = tmp_path_factory.mktemp("phantoms") / "ds"
    for index, shape in enumerate([(24, 64, 64), (20, 72, 60), (28, 56, 64), (24, 64, 72)]):
        image, label = make_phantom(shape, SPACING, seed=(7, index))
        store_case(path, f"case_{index}", image, label, SPACING, class_names=SYNTH_CLASS_NAMES)
    return path


def stream(path, **options) -> PatchStream:
    options = {"patch_size": PATCH, "seed": 5, "transform": None, "normalization": WINDOW} | options
    return PatchStream(path, **options)


def collect(loader: PatchLoader, batches: int) -> list[dict]:
    return [next(loader) for _ in range(batches)]


def flat(batches: list[dict], key: str) -> list:
    return [value for batch in batches for value in (batch[key].tolist() if key != "case" else batch[key])]


# -- sharding and determinism -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_produce_disjoint_patches_covering_the_global_sequence(phantoms):
    batches_per_rank, batch_size = 6, 2
    noisy = AugmentationConfig(noise_probability=1.0)  # makes every produced patch's content unique
    seen = {}
    for rank in range(2):
        loader = PatchLoader(
            stream(phantoms, rank=rank, world_size=2, transform=noisy, trim_every=1 + rank),  # memory trimmed too
            batch_size=batch_size,
            num_workers=2,
        )
        batches = collect(loader, batches_per_rank)
        loader.close()
        seen[rank] = batches
        # each rank's batches come in its own order: position p is global patch p * world_size + rank
        assert flat(batches, "index") == [p * 2 + rank for p in range(batches_per_rank * batch_size)]
    indices = flat(seen[0], "index") + flat(seen[1], "index")
    assert sorted(indices) == list(range(2 * batches_per_rank * batch_size))  # no patch twice, none missing
    images = torch.cat([b["image"] for batches in seen.values() for b in batches])
    assert len({image.numpy().tobytes() for image in images}) == len(indices)  # no worker repeated another
    # the positions are independent draws, not one sequence replayed per rank or worker (the classic bug of
    # seeding every rank alike); a (case, start) pair can recur only by chance
    starts = [
        (c, tuple(loc)) for b in seen.values() for c, loc in zip(flat(b, "case"), flat(b, "location"), strict=True)
    ]
    assert len(set(starts)) >= 0.9 * len(starts)
    assert flat(seen[0], "location") != flat(seen[1], "location")


@pytest.mark.slow
def test_the_order_does_not_depend_on_the_number_of_workers_and_resume_is_exact(phantoms):
    augmented = {"transform": AugmentationConfig(affine_probability=0.5, low_resolution_probability=0.5)}
    reference = PatchLoader(stream(phantoms, **augmented), batch_size=3, num_workers=0)
    expected = collect(reference, 5)

    loader = PatchLoader(stream(phantoms, **augmented), batch_size=3, num_workers=2)
    first = collect(loader, 3)
    state = loader.state_dict()
    loader.close()
    assert state["position"] == 9

    restored = PatchLoader(stream(phantoms, **augmented), batch_size=3, num_workers=2, pin_memory=True)
    restored.load_state_dict(state)
    rest = collect(restored, 2)
    restored.close()
    for got, want in zip(first + rest, expected, strict=True):
        assert got["case"] == want["case"]
        assert torch.equal(got["location"], want["location"])
        assert torch.equal(got["image"], want["image"])  # augmentation included, bit for bit
        assert torch.equal(got["label"], want["label"])


def test_a_stream_is_a_pure_function_of_seed_and_position(phantoms):
    a, b = stream(phantoms, transform=AugmentationConfig()), stream(phantoms, transform=AugmentationConfig())
    for position in (0, 17, 3):
        x, y = a.sample(position), b.sample(position)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    other_seed = stream(phantoms, seed=6).sample(0)
    assert not torch.equal(other_seed["image"], stream(phantoms).sample(0)["image"])
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    a.sample(1)  # augmenting must not consume the caller's torch random numbers
    assert torch.equal(torch.rand(3), before)


def test_state_from_a_different_world_size_skips_no_global_patch_and_repeats_none(phantoms):
    state = {"position": 10, "seed": 5, "rank": 0, "world_size": 4}  # 40 global patches consumed
    resumed = [stream(phantoms, rank=r, world_size=3) for r in range(3)]
    for s in resumed:
        s.load_state_dict(state)
    firsts = sorted(s.global_index(s.position) for s in resumed)
    assert firsts == [42, 43, 44]  # ceil(40 / 3) = 14 positions per rank: nothing before 40 again
    with pytest.raises(DataError, match="seed 9"):
        stream(phantoms).load_state_dict(state | {"seed": 9})
    with pytest.raises(DataError, match="missing key 'position'"):
        stream(phantoms).load_state_dict({"seed": 5, "world_size": 1})


# -- what a patch contains ------------------------------------------------------------------------------------


def test_a_patch_without_augmentation_is_the_normalised_region_at_its_location(phantoms):
    s = stream(phantoms)
    dataset = open_dataset(phantoms)
    for position in range(6):
        sample = s.sample(position)
        case = dataset.case(sample["case"])
        start = sample["location"].tolist()
        assert sample["image"].shape == (1, *PATCH) and sample["image"].dtype == torch.float32
        assert sample["label"].shape == PATCH and sample["label"].dtype == torch.int64
        np.testing.assert_array_equal(sample["image"][0].numpy(), WINDOW(case.read_image(start, PATCH)))
        np.testing.assert_array_equal(sample["label"].numpy(), case.read_label(start, PATCH))


def test_normalisation_does_not_depend_on_the_patch(phantoms):
    dataset = open_dataset(phantoms)
    normalization = CTNormalization.from_dataset(dataset)
    foreground = dataset.statistics["foreground_intensity"]
    assert normalization.center == pytest.approx(foreground["mean"])
    assert normalization.scale == pytest.approx(foreground["std"])
    case = dataset.case("case_0")
    s = stream(phantoms, normalization=normalization)
    # two overlapping patches of one case: the shared voxels get identical values
    first = s.crop(case, (0, 0, 0), None)[0][0].numpy()
    second = s.crop(case, (4, 10, 12), None)[0][0].numpy()
    np.testing.assert_array_equal(first[4:, 10:, 12:], second[: PATCH[0] - 4, : PATCH[1] - 10, : PATCH[2] - 12])
    hu = case.read_image((0, 0, 0), PATCH).astype(np.float64)
    expected = (np.clip(hu, foreground["percentile_00_5"], foreground["percentile_99_5"]) - foreground["mean"]) / (
        foreground["std"]
    )
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)


def test_the_foreground_fraction_holds_and_foreground_patches_contain_their_class(phantoms):
    s = stream(phantoms, foreground_fraction=0.4)
    draws = [s.sampler.draw(index) for index in range(600)]
    share = np.mean([d.foreground_class > 0 for d in draws])
    assert abs(share - 0.4) < 0.06  # binomial sd 0.02
    for position in range(40):
        sample = s.sample(position)
        draw = s.sampler.draw(s.global_index(position))
        if draw.foreground_class:
            assert (sample["label"] == draw.foreground_class).any()
    only_lesions = stream(phantoms, foreground_fraction=1.0, class_probabilities={3: 1.0})
    classes = {only_lesions.sampler.draw(index).foreground_class for index in range(100)}
    assert classes == {3}
    uniform = stream(phantoms, foreground_fraction=0.0)
    lesion_share = np.mean([(uniform.sample(p)["label"] == 3).any().item() for p in range(30)])
    forced_share = np.mean([(only_lesions.sample(p)["label"] == 3).any().item() for p in range(30)])
    assert forced_share == 1.0 and lesion_share < 0.8


def test_a_patch_larger_than_the_volume_is_padded_around_it(tmp_path):
    image, label = make_phantom((10, 20, 24), SPACING, seed=3)
    store_case(tmp_path / "ds", "small", image, label, SPACING, class_names=SYNTH_CLASS_NAMES)
    s = stream(tmp_path / "ds", patch_size=(16, 32, 32), foreground_fraction=0.5)
    for position in range(8):
        sample = s.sample(position)
        start = sample["location"].numpy()
        assert sample["image"].shape == (1, 16, 32, 32)
        assert ((start <= 0) & (start >= np.array([10, 20, 24]) - np.array([16, 32, 32]))).all()
        inside = tuple(slice(-s_, -s_ + n) for s_, n in zip(start, image.shape, strict=True))
        np.testing.assert_array_equal(sample["label"].numpy()[inside], label)  # the whole volume, in place
        np.testing.assert_array_equal(sample["image"][0].numpy()[inside], WINDOW(image))
        outside = np.ones((16, 32, 32), bool)
        outside[inside] = False
        assert (sample["image"][0].numpy()[outside] == -1.0).all()  # -1024 HU clipped to the window
        assert (sample["label"].numpy()[outside] == 0).all()


def test_augmented_patches_have_the_patch_size_with_an_anisotropic_margin(phantoms):
    config = AugmentationConfig(affine_probability=1.0, low_resolution_probability=1.0)
    s = stream(phantoms, transform=config)
    margin = s.crop.margin_for(open_dataset(phantoms).case("case_0"))
    assert margin[0] < margin[1] and margin[0] < margin[2]  # rotation about z only: little context along z
    for position in range(4):
        sample = s.sample(position)
        assert sample["image"].shape == (1, *PATCH) and sample["label"].shape == PATCH
        assert torch.isfinite(sample["image"]).all()
        assert set(sample["label"].unique().tolist()) <= {0, 1, 2, 3}


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_validation_patches_are_fixed_and_split_across_ranks(phantoms):
    dataset = open_dataset(phantoms)
    training, held_out = split_cases(dataset.case_names, 2, seed=1)
    assert len(held_out) == 2 and not set(training) & set(held_out)
    assert split_cases(dataset.case_names, 2, seed=1) == (training, held_out)
    options = {"cases": held_out, "patch_size": PATCH, "patches_per_case": 3, "normalization": WINDOW}
    whole = ValidationPatches(dataset, **options)
    again = ValidationPatches(dataset, **options)
    assert whole.draws == again.draws and len(whole) == 6
    assert {d.case for d in whole.draws} == set(held_out)
    shares = [ValidationPatches(dataset, rank=r, world_size=2, **options) for r in range(2)]
    assert sorted(item["index"] for share in shares for item in share) == list(range(6))
    loader = validation_loader(shares[1], batch_size=2, num_workers=1, persistent_workers=True)
    first, second = list(loader), list(loader)  # the persistent worker serves both passes
    assert sum(len(b["case"]) for b in first) == len(shares[1])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["case"] == b["case"]
    for item, draw in zip(whole, whole.draws, strict=True):
        case = dataset.case(draw.case)
        np.testing.assert_array_equal(item["image"][0].numpy(), WINDOW(case.read_image(draw.start, PATCH)))


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_corrupted_chunk_fails_naming_the_case_also_from_a_worker(tmp_path):
    image, label = make_phantom((16, 32, 32), SPACING, seed=1)
    store_case(tmp_path / "ds", "broken_case", image, label, SPACING, class_names=SYNTH_CLASS_NAMES)
    for chunk in (tmp_path / "ds" / "broken_case" / "0" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a blosc chunk" * 10)
    s = stream(tmp_path / "ds", patch_size=(8, 16, 16))
    with pytest.raises(DataError, match="broken_case"):
        s.sample(0)
    loader = PatchLoader(stream(tmp_path / "ds", patch_size=(8, 16, 16)), batch_size=2, num_workers=1)
    with pytest.raises(DataError, match="case broken_case: reading the image region") as caught:
        next(loader)
    assert "Original Traceback" not in str(caught.value)  # one clear line, not the worker's traceback
    loader.close()


@pytest.mark.slow
def test_bad_arguments_are_named(phantoms, tmp_path):
    with pytest.raises(DataError, match="patch_size"):
        stream(phantoms, patch_size=(8, 0, 8))
    with pytest.raises(DataError, match="rank 2 / world_size 2"):
        stream(phantoms, rank=2, world_size=2)
    with pytest.raises(DataError, match="foreground_fraction"):
        stream(phantoms, foreground_fraction=1.5)
    with pytest.raises(DataError, match="class 7 is not a foreground class 1..3"):
        stream(phantoms, class_probabilities={7: 1.0})
    with pytest.raises(DataError, match="no case 'nope'"):
        stream(phantoms, cases=["nope"])
    with pytest.raises(DataError, match="trim_every"):
        stream(phantoms, trim_every=-1)
    with pytest.raises(DataError, match="num_workers"):
        PatchLoader(stream(phantoms), batch_size=2, num_workers=-1)
    image, _ = make_phantom((16, 32, 32), SPACING, seed=1)
    store_case(tmp_path / "unlabelled", "no_label", image, None, SPACING)
    with pytest.raises(DataError, match="case 'no_label' has no label"):
        stream(tmp_path / "unlabelled")
    with pytest.raises(DataError, match="somewhere: no foreground intensity statistics"):
        CTNormalization.from_statistics({"foreground_intensity": None}, "somewhere")
    with pytest.raises(DataError, match=r"window: expected low < high HU, got \[100.0, -100.0\]"):
        CTNormalization.window(100, -100)


def _read_in_forked_child(path, queue) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = stream(path).sample(0)
    queue.put((sample["image"].numpy(), [str(w.message) for w in caught]))


@pytest.mark.slow  # forks the whole test process: ~10 s once the quick set has loaded everything
def test_a_process_forked_after_zarrs_was_used_reads_through_zarr_python_instead_of_hanging(phantoms):
    expected = stream(phantoms).sample(0)["image"].numpy()  # this process now uses zarrs' thread pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_forked_child, args=(phantoms, queue))
    child.start()
    image, messages = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(image, expected)
    assert any("forked after its parent read Zarr through zarrs" in m for m in messages)
