"""The square's symmetries on images and CosmoSim targets: closed forms, a group check, and CosmoSim itself."""

import subprocess
import sys

import numpy as np
import pytest

from jaxnets.data.symmetry import SYMMETRIES, TargetSymmetry, inverse, transform_images
from jaxnets.data.targets import TargetEncoding

ROTATE = np.array([[0, -1], [1, 0]])  # a quarter turn anticlockwise
MIRROR_Y = np.array([[1, 0], [0, -1]])  # y -> -y: upside down
TRANSPOSE = np.array([[0, -1], [-1, 0]])  # (x, y) -> (-y, -x): the array transposed


def test_symmetries_are_the_eight_of_the_square_identity_first():
    assert len(SYMMETRIES) == 8
    assert np.array_equal(SYMMETRIES[0], np.eye(2))
    assert len({m.tobytes() for m in SYMMETRIES}) == 8
    for a in SYMMETRIES:  # a group: every product of two is one of the eight, each has its inverse among them
        assert np.array_equal(a @ inverse(a), np.eye(2))
        assert any(np.array_equal(inverse(a), c) for c in SYMMETRIES)
        for b in SYMMETRIES:
            assert any(np.array_equal(a @ b, c) for c in SYMMETRIES)


def test_images_move_as_numpy_rotates_and_flips_them():
    image = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)  # [batch, H, W, C]
    assert np.array_equal(transform_images(image, ROTATE), np.rot90(image, 1, axes=(1, 2)))
    assert np.array_equal(transform_images(image, MIRROR_Y), image[:, ::-1])
    assert np.array_equal(transform_images(image, TRANSPOSE), image.transpose(0, 2, 1, 3))
    assert np.array_equal(transform_images(image, -np.eye(2, dtype=int)), image[:, ::-1, ::-1])
    for matrix in SYMMETRIES:  # composing with the inverse gives the image back
        assert np.array_equal(transform_images(transform_images(image, matrix), inverse(matrix)), image)


def test_a_point_of_light_moves_to_the_matrix_times_its_position():
    size = 5
    for matrix in SYMMETRIES:
        image = np.zeros((size, size, 1))
        image[0, 3] = 1  # row 0, column 3: x = 3 - 2 = 1, y = 2 - 0 = 2 about the centre
        moved = transform_images(image, matrix)
        x, y = matrix @ np.array([1, 2])
        assert moved[2 - y, 2 + x, 0] == 1 and moved.sum() == 1


def test_targets_in_closed_form():
    names = [
        "sigma",
        "xiX",
        "xiY",
        "theta",
        "phi",
        "alpha[1][0]",
        "alpha[1][2]",
        "beta[1][2]",
        "alpha[0][1]",
        "beta[0][1]",
    ]
    symmetry = TargetSymmetry.for_targets(names)
    row = np.array([2.0, 3.0, 4.0, 30.0, 300.0, 5.0, 1.0, 2.0, 6.0, 7.0])
    turned = symmetry.apply(row, ROTATE)
    # sigma stays; xi turns; angles gain 90 degrees; s = 0 stays; s = 2 turns by 180 (negates); s = 1 by 90
    np.testing.assert_allclose(turned, [2, -4, 3, 120, 30, 5, -1, -2, -7, 6], atol=1e-12)
    mirrored = symmetry.apply(row, MIRROR_Y)
    np.testing.assert_allclose(mirrored, [2, 3, -4, 150, 60, 5, 1, -2, 6, -7], atol=1e-12)
    for matrix in SYMMETRIES:  # the inverse undoes every move
        np.testing.assert_allclose(symmetry.apply(symmetry.apply(row, matrix), inverse(matrix)), row, atol=1e-9)


def test_averaging_a_perfect_models_views_gives_its_outputs_back():
    # A model that is right on every view outputs the moved targets for each moved image; moving each back and
    # averaging gives the outputs for the image itself (a view moved back the wrong way round would not: a quarter
    # turn is not its own inverse).
    names = ["xiX", "xiY", "theta", "alpha[1][2]", "beta[1][2]", "alpha[2][1]", "beta[2][1]", "sigma"]
    symmetry = TargetSymmetry.for_targets(names)
    rng = np.random.default_rng(0)
    true = rng.normal(size=(6, len(names)))
    true[:, 2] = [0.5, 10, 45, 90, 135, 179.5]  # theta near both ends of its period
    encoding = TargetEncoding.fit(names, {"theta": 180.0}, true, standardize=True)
    outputs = [encoding.encode(symmetry.apply(true, matrix)) for matrix in SYMMETRIES]
    averaged = symmetry.average_outputs(encoding, outputs, SYMMETRIES)
    np.testing.assert_allclose(averaged, encoding.encode(true), atol=1e-9)
    decoded = encoding.decode(averaged)
    np.testing.assert_allclose(np.delete(decoded, 2, axis=1), np.delete(true, 2, axis=1), atol=1e-9)
    np.testing.assert_allclose((decoded[:, 2] - true[:, 2] + 90) % 180 - 90, 0, atol=1e-9)


def test_an_angles_views_average_as_vectors_weighted_by_their_length():
    # theta 179 (sure: length 1) and 1 degree (unsure: length 0.5) average as vectors of the doubled angle: the mean
    # points between them, nearer the longer one (about 179.67); never to 90, the plain mean.
    encoding = TargetEncoding.fit(["theta"], {"theta": 180.0}, None, standardize=False)
    turns = np.radians([2 * 179.0, 2 * 1.0])
    outputs = [[[np.cos(turns[0]), np.sin(turns[0])]], [[0.5 * np.cos(turns[1]), 0.5 * np.sin(turns[1])]]]
    identity = [np.eye(2, dtype=int)] * 2
    averaged = TargetSymmetry.for_targets(["theta"]).average_outputs(encoding, outputs, identity)
    lengths = np.array([1.0, 0.5])
    expected = np.degrees(np.arctan2(np.mean(lengths * np.sin(turns)), np.mean(lengths * np.cos(turns)))) / 2
    np.testing.assert_allclose(encoding.decode(averaged)[0, 0] % 180, expected % 180, atol=1e-9)
    assert 179 < encoding.decode(averaged)[0, 0] < 180


def test_targets_without_a_rule_are_refused_by_name():
    with pytest.raises(ValueError, match=r"no rotation or mirror rule for the targets flux, xiX \(without xiY\)"):
        TargetSymmetry.for_targets(["sigma", "flux", "xiX"])
    with pytest.raises(ValueError, match=r"alpha\[1\]\[2\] \(without beta\[1\]\[2\]\)"):
        TargetSymmetry.for_targets(["alpha[1][2]"])
    with pytest.raises(ValueError, match=r"theta \(period 3.14159, not CosmoSim's 180\)"):
        TargetSymmetry.for_targets(["theta"], {"theta": 3.14159})
    TargetSymmetry.for_targets(["alpha[1][0]", "sigma"])  # alpha[m][0] needs no beta: it never turns
    with pytest.raises(ValueError, match="not a symmetry of the square"):
        transform_images(np.zeros((1, 4, 4, 1)), np.array([[2, 0], [0, 1]]))
    with pytest.raises(ValueError, match="H == W"):
        transform_images(np.zeros((1, 4, 5, 1)), ROTATE)
    # The identity is the one view of images that are not square (or not images: an MLP's [batch, features]).
    for shape in ((1, 4, 5, 1), (3, 6)):
        images = np.arange(np.prod(shape)).reshape(shape)
        np.testing.assert_array_equal(transform_images(images, SYMMETRIES[0]), images)


SIE_TOML = """
[simulator]
model = "Raytrace"
nterms = 3
imagesize = 200
cropsize = 128
centred = true
[lens]
mode = "SIE"
[source]
mode = "SersicSphere"
"""


@pytest.mark.slow
def test_the_rules_are_cosmosims_own(tmp_path):
    """CosmoSim simulates a lens and the same lens moved by each generator of the group (mirror, transpose, quarter
    turn): its image is the moved image (to a pixel of centring) and its xi and amplitudes are the moved ones."""
    pytest.importorskip("CosmoSim")
    import pandas as pd
    from PIL import Image

    (tmp_path / "sie.toml").write_text(SIE_TOML)
    base = dict(model="Raytrace", lens="SIE", source="SersicSphere", einsteinradius=20.0, ellipseratio=0.4)
    base.update(sigma=2.0, sigma2=2.0, theta=0.0, n_sersic=2.0, luminosity=15.0)
    x, y, orientation = 9.0, 4.0, 25.0  # source position (from the lens) and lens axis, planar and degrees
    moves = {
        "identity": (np.eye(2, dtype=int), (x, y, orientation)),
        "mirror": (MIRROR_Y, (x, -y, -orientation)),
        "transpose": (TRANSPOSE, (-y, -x, 90 - orientation)),
        "turn": (ROTATE, (-y, x, orientation + 90)),
    }
    rows = [
        dict(base, index=i, filename=f"image-{i}.png", x=mx, y=my, orientation=o % 180)
        for i, (_, (mx, my, o)) in enumerate(moves.values())
    ]
    _simulate(tmp_path, "sie.toml", rows)
    out = pd.read_csv(tmp_path / "out.csv")
    positions = ["xiX", "xiY", "lensX", "lensY", "centreX", "centreY"]  # from the centre of light
    names = positions + [c for c in out.columns if c.startswith(("alpha[", "beta["))]
    symmetry = TargetSymmetry.for_targets(names)
    image = np.asarray(Image.open(tmp_path / "images" / "image-0.png"), np.float64)[..., None]
    true = out[names].to_numpy(np.float64)
    amplitudes = slice(len(positions), None)
    for i, (matrix, _) in enumerate(moves.values()):
        expected = symmetry.apply(true[0], matrix)
        scale = np.abs(true[0, amplitudes]).max()
        np.testing.assert_allclose(true[i, amplitudes], expected[amplitudes], atol=1e-6 * scale)
        # CosmoSim measures positions from the centre of light, which it rounds to a pixel when centring
        np.testing.assert_allclose(true[i, : len(positions)], expected[: len(positions)], atol=2.0)
        simulated = np.asarray(Image.open(tmp_path / "images" / f"image-{i}.png"), np.float64)[..., None]
        # the correlation of the light with each move of the first image: the rule's move matches, and no other
        match = [_correlation(transform_images(image, other), simulated) for other in SYMMETRIES]
        assert max(match) == match[[m.tobytes() for m in SYMMETRIES].index(matrix.tobytes())] > 0.9


def _simulate(folder, toml: str, rows: list[dict]) -> None:
    """CosmoSim's images of `rows` (its parameter CSV's columns) in folder/images, their targets in out.csv."""
    import pandas as pd

    pd.DataFrame(rows).to_csv(folder / "in.csv", index=False)
    subprocess.run(
        [sys.executable, "-m", "CosmoSim", "--toml", toml, "--csvfile", "in.csv", "--outfile", "out.csv"]
        + ["--directory", "images", "--imagesize", "200", "--nterms", "3"],
        cwd=folder,
        check=True,
        capture_output=True,
    )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The highest correlation of a and b over shifts of a by up to a pixel: CosmoSim centres the light on a
    pixel, not between two, so a mirrored or turned image may sit a pixel off."""
    return max(
        np.corrcoef(np.roll(a, (rows, columns), (0, 1)).ravel(), b.ravel())[0, 1]
        for rows in (-1, 0, 1)
        for columns in (-1, 0, 1)
    )


@pytest.mark.slow
def test_a_clusters_lens_columns_move_by_the_rules_cosmosim_draws_with(tmp_path):
    """A cluster of two SIE lenses and the cluster moved by each generator (its lenses' positions and axes moved,
    listed in another order once): CosmoSim's image is the moved image, and the columns read from the `cluster`
    cells (einsteinradius[k], ellipseratio[k], orientation[k]) are the first row's moved by the rule."""
    pytest.importorskip("CosmoSim")
    from PIL import Image

    from jaxnets.data import load_dataset

    (tmp_path / "cluster.toml").write_text(SIE_TOML + "[cluster]\ncount = 2\n")
    lenses = [(10.0, 5.0, 25.0, 0.4, 30.0), (-8.0, -6.0, 15.0, 0.6, 100.0)]  # x, y, Einstein radius, ratio, axis
    moves = {
        "identity": (np.eye(2, dtype=int), lambda x, y, o: (x, y, o)),
        "mirror": (MIRROR_Y, lambda x, y, o: (x, -y, -o)),
        "transpose": (TRANSPOSE, lambda x, y, o: (-y, -x, 90 - o)),
        "turn": (ROTATE, lambda x, y, o: (-y, x, o + 90)),
    }
    rows = []
    for i, (name, (_, move)) in enumerate(moves.items()):
        moved = [(*move(x, y, o)[:2], radius, ratio, move(x, y, o)[2] % 180) for x, y, radius, ratio, o in lenses]
        if name == "transpose":
            moved.reverse()  # the order CosmoSim lists the lenses in is not a parameter
        cluster = ";".join("SIE/" + "/".join(f"{v:g}" for v in lens) for lens in moved)
        sx, sy, _ = move(9.0, 4.0, 0.0)
        rows.append(dict(index=i, filename=f"image-{i}.png", model="Raytrace", cluster=cluster, source="SersicSphere"))
        rows[-1].update(sigma=2.0, sigma2=2.0, theta=0.0, n_sersic=2.0, luminosity=15.0, x=sx, y=sy)
    # another cluster, so that no column is constant (a pattern leaves constant columns out)
    rows.append(dict(rows[0], index=4, filename="image-4.png", cluster="SIE/1/2/20/0.5/10;SIE/-3/4/30/0.7/20"))
    _simulate(tmp_path, "cluster.toml", rows)
    names = ["einsteinradius[*]", "ellipseratio[*]", "orientation[*]"]
    dataset = load_dataset(
        data=str(tmp_path / "in.csv"), targets=names, data_dir=str(tmp_path / "tfds"), validation_fraction=0.0
    )
    assert dataset.target_names == tuple(
        f"{p}[{k}]" for p in ("einsteinradius", "ellipseratio", "orientation") for k in (1, 2)
    )
    train = dataset.splits["train"]
    targets = {train.source[i]["row"]: train[i]["target"] for i in range(len(train))}
    symmetry = TargetSymmetry.for_targets(dataset.target_names, dataset.angles)
    image = np.asarray(Image.open(tmp_path / "images" / "image-0.png"), np.float64)[..., None]
    for i, (matrix, _) in enumerate(moves.values()):
        difference = symmetry.apply(targets[0], matrix) - targets[i]
        difference[4:] = (difference[4:] + 90) % 180 - 90  # the axes, modulo their period
        np.testing.assert_allclose(difference, 0, atol=1e-4)
        simulated = np.asarray(Image.open(tmp_path / "images" / f"image-{i}.png"), np.float64)[..., None]
        match = [_correlation(transform_images(image, other), simulated) for other in SYMMETRIES]
        # the rule's move matches best (CosmoSim centres the light to a pixel: a mirror sits up to 3 px off here)
        rule = [m.tobytes() for m in SYMMETRIES].index(matrix.tobytes())
        assert match[rule] > 0.8 > max(match[:rule] + match[rule + 1 :])
