"""Loading every format, the built-in datasets and their densities, and bad input."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from bdiff.data import (PixelCoding, PowerCoding, Standardizer, coding_from_dict, discrete_columns, fingerprint,
                        load_data, save_array, yeo_johnson_power)
from bdiff.datasets import BUILTINS
from bdiff.errors import BdiffError


def test_formats_round_trip(tmp_path, rng):
    values = rng.normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", values)
    np.savez(tmp_path / "one.npz", x=values)
    np.savez(tmp_path / "two.npz", x=values, y=values[:, :2])
    np.savetxt(tmp_path / "plain.csv", values, delimiter=",")
    (tmp_path / "header.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in values))
    save_file({"data": values}, str(tmp_path / "a.safetensors"))
    for name in ["a.npy", "one.npz", "plain.csv", "header.csv", "a.safetensors"]:
        loaded = load_data(tmp_path / name)
        np.testing.assert_allclose(loaded.values, values, rtol=1e-6, err_msg=name)
    assert load_data(tmp_path / "two.npz", key="y").values.shape == (50, 2)
    with pytest.raises(BdiffError, match="--key"):
        load_data(tmp_path / "two.npz")
    with pytest.raises(BdiffError, match="no array 'z'"):
        load_data(tmp_path / "two.npz", key="z")


def test_images_flatten_and_keep_their_shape(tmp_path, rng):
    np.save(tmp_path / "img.npy", rng.random((10, 2, 5, 4)))
    loaded = load_data(tmp_path / "img.npy")
    assert loaded.values.shape == (10, 40) and loaded.item_shape == (2, 5, 4)


def test_one_dimensional_vector_is_one_column(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(5.0))
    assert load_data(tmp_path / "v.npy").values.shape == (5, 1)


BAD = {
    "nan.npy": (lambda p: np.save(p, np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 1.0]])), "NaN or inf"),
    "inf.npy": (lambda p: np.save(p, np.array([[1.0], [np.inf]])), "NaN or inf"),
    "empty.npy": (lambda p: np.save(p, np.zeros((0, 2))), "empty"),
    "onerow.npy": (lambda p: np.save(p, np.zeros((1, 2))), "at least 2 rows"),
    "scalar.npy": (lambda p: np.save(p, np.float64(3.0)), "expected shape"),
    "rank5.npy": (lambda p: np.save(p, np.zeros((2, 1, 1, 1, 1))), "expected shape"),
    "strings.npy": (lambda p: np.save(p, np.array([["a", "b"], ["c", "d"]])), "expected numbers"),
    "objects.npy": (lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True), "pickled"),
    # lines as an editor counts them, blank and header lines included
    "words.csv": (lambda p: p.write_text("x,y\n1,2\nfoo,3\n"), "not a numeric CSV: line 3, column 1: 'foo' is not a number"),
    "blank_line.csv": (lambda p: p.write_text("1,2\n\n3,4\n5,z\n"), "line 4, column 2: 'z' is not a number"),
    "empty_field.csv": (lambda p: p.write_text("1,2\n3,\n"), "line 2, column 2 is empty"),
    "ragged.csv": (lambda p: p.write_text("a,b\n1,2\n3,4,5\n"), "line 3 has 3 values, but line 2 has 2"),
    "garbage.npy": (lambda p: p.write_bytes(b"not a numpy file at all"), "cannot read"),
    "garbage.npz": (lambda p: p.write_bytes(b"PK\x03\x04 broken zip"), "cannot read"),
    "garbage.safetensors": (lambda p: p.write_bytes(b"\x00\x01"), "cannot read"),
    "data.txt": (lambda p: p.write_text("1,2\n"), "supported formats"),
    # distinct in float64, one value or a coarse grid in float32 (the model's precision): it
    # read "all rows are identical", and a 1 % grid would train on steps of the data
    "offset.npy": (lambda p: np.save(p, 1e6 + np.random.default_rng(0).normal(0, 1e-3, (50, 2))),
                   "column 0 .* float32 .* subtract"),
    "utm.npy": (lambda p: np.save(p, np.c_[np.arange(50.0), 5e6 + np.random.default_rng(0).normal(0, 1, 50)]),
                "column 1 .* float32 .* subtract"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_gives_one_clear_error(tmp_path, name):
    write, message = BAD[name]
    write(tmp_path / name)
    with pytest.raises(BdiffError, match=message):
        load_data(tmp_path / name)


def test_missing_file_and_unknown_name():
    with pytest.raises(BdiffError, match="no such file"):
        load_data("/nonexistent/data.npy")
    with pytest.raises(BdiffError, match="built-in"):
        load_data("no-such-dataset")


def test_standardizer_round_trip_and_constant_columns(rng):
    values = np.column_stack([rng.normal(5, 3, 100), np.full(100, 7.0)]).astype(np.float32)
    st = Standardizer.fit(values)
    z = st.forward(values)
    assert np.allclose(z[:, 0].mean(), 0, atol=1e-5) and np.allclose(z[:, 0].std(), 1, atol=1e-4)
    assert np.all(np.isfinite(z)) and np.allclose(st.inverse(z), values, atol=1e-4)
    assert Standardizer.from_dict(st.to_dict()).std.tolist() == st.std.tolist()


def test_fingerprint_tells_data_apart(rng):
    a = rng.normal(size=(20, 2))
    assert fingerprint(a) == fingerprint(a.copy()) != fingerprint(a + 1e-3)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_load_and_split(name):
    train, held = BUILTINS[name].load("train", n=500), BUILTINS[name].load("heldout", n=500)
    assert train.dtype == np.float32 and train.ndim == 2 and np.isfinite(train).all()
    assert not np.array_equal(train[:10], held[:10])
    assert np.array_equal(train, BUILTINS[name].load("train", n=500))  # deterministic


@pytest.mark.parametrize("name", ["intervals", "mixture", "clusters", "checkerboard"])
def test_known_densities_integrate_to_one_and_match_samples(name):
    law = BUILTINS[name].law
    values = BUILTINS[name].load("train", n=20000)
    dim = values.shape[1]
    lo, hi = values.min(0) - 1.5, values.max(0) + 1.5
    axes = [np.linspace(a, b, 3000 if dim == 1 else 400) for a, b in zip(lo, hi)]
    grid = np.stack([m.ravel() for m in np.meshgrid(*axes, indexing="ij")], 1)
    cell = np.prod([ax[1] - ax[0] for ax in axes])
    for noise in (0.0, 0.05):
        mass = law.smoothed_density(grid, np.full(dim, noise)).sum() * cell
        assert mass == pytest.approx(1.0, abs=0.01), (name, noise)
    shares = np.bincount(law.component(values), minlength=len(law.weights)) / len(values)
    np.testing.assert_allclose(shares, law.weights, atol=0.015)


def test_save_array_is_atomic_and_checks_paths(tmp_path, rng):
    target = tmp_path / "s.npy"
    save_array(target, rng.normal(size=(4, 2)))
    before = target.read_bytes()
    with pytest.raises(BdiffError, match="does not exist"):
        save_array(tmp_path / "missing" / "s.npy", np.zeros((2, 2)))
    with pytest.raises(BdiffError, match=".npy or .csv"):
        save_array(tmp_path / "s.txt", np.zeros((2, 2)))
    assert target.read_bytes() == before
    save_array(tmp_path / "s.csv", np.ones((3, 2)))
    assert (tmp_path / "s.csv").read_text().count("\n") == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_standardizer_matches_numpy_per_column_and_pooled(rng):
    values = rng.normal(3.0, [1.0, 5.0, 0.2], size=(1000, 3)).astype(np.float32)
    per_column = Standardizer.fit(values)
    assert np.allclose(per_column.std, values.std(0, dtype=np.float64), rtol=1e-6)
    assert np.allclose(per_column.mean, values.mean(0, dtype=np.float64), rtol=1e-6)
    pooled = Standardizer.fit(values, pooled=True)
    assert np.allclose(pooled.std, (values - values.mean(0)).std(dtype=np.float64), rtol=1e-5)


def test_pixel_coding_keeps_samples_on_the_data_grid_and_in_its_range(rng):
    """Integer pixels: the cell centres come back exactly, and any code at all (a sample) maps
    to a pixel of the grid inside the data's range; continuous pixels round-trip and stay in
    the box. The log-Jacobian matches finite differences."""
    pixels = rng.integers(0, 17, size=(50, 6)).astype(np.float32)
    pixels[0, 0], pixels[0, 1] = 0, 16
    coding = PixelCoding.fit(pixels)
    assert (coding.low, coding.high, coding.integer) == (0.0, 16.0, True)
    assert np.array_equal(coding.inverse(coding.forward(pixels)), pixels)
    noise = rng.random(pixels.shape)
    assert np.array_equal(coding.inverse(coding.forward(pixels, noise)), pixels)  # dequantised, floored back
    anything = coding.inverse(rng.normal(scale=20, size=(200, 6)))
    assert anything.min() >= 0 and anything.max() <= 16 and np.array_equal(anything, np.floor(anything))
    smooth = PixelCoding.fit(rng.uniform(-1, 3, size=(40, 3)))
    values = rng.uniform(-0.9, 2.9, size=(5, 3))
    assert not smooth.integer and np.allclose(smooth.inverse(smooth.forward(values)), values)
    assert smooth.inverse(np.full((1, 3), 1e3)).max() <= smooth.high
    assert np.array_equal(smooth.inverse(smooth.forward(np.full((1, 3), smooth.low))), np.full((1, 3), smooth.low))
    h = 1e-6
    numeric = sum(np.log((smooth.forward(values + h * e) - smooth.forward(values - h * e)) @ e / (2 * h))
                  for e in np.eye(3))
    assert np.allclose(smooth.log_jacobian(values), numeric, atol=1e-5)
    with pytest.raises(BdiffError, match="two distinct"):
        PixelCoding.fit(np.ones((4, 4)))


def test_standardizer_with_pixel_coding_round_trips_through_its_dict(rng):
    pixels = rng.integers(0, 17, size=(30, 8)).astype(np.float32)
    pixels[:, 0] = 0  # a pixel blank in every image stays blank
    scale = Standardizer.fit(pixels, pooled=True, coding=PixelCoding.fit(pixels))
    again = Standardizer.from_dict(scale.to_dict())
    assert again.coding == scale.coding
    assert np.array_equal(again.forward(pixels), scale.forward(pixels))
    assert np.array_equal(again.inverse(scale.forward(pixels)), pixels)
    assert np.all(again.inverse(rng.normal(size=(10, 8)))[:, 0] == 0)


def test_columns_with_few_values_come_back_on_those_values(rng):
    """A 0/1 column and a 5-level code are snapped to their values by inverse(); a column with
    more than DISCRETE_MAX_VALUES distinct values is left continuous. The grid survives to_dict."""
    values = np.column_stack([rng.integers(0, 2, 300), rng.choice([1.5, 2.0, 4.0, 7.0, 9.5], 300),
                              rng.integers(0, 21, 300), rng.normal(size=300)]).astype(np.float32)
    scale = Standardizer.fit(values)
    assert sorted(scale.discrete) == [0, 1]
    again = Standardizer.from_dict(scale.to_dict())
    back = again.inverse(rng.normal(size=(500, 4)).astype(np.float32) * 2)
    assert set(np.unique(back[:, 0])) <= {0.0, 1.0} and set(np.unique(back[:, 1])) <= {1.5, 2.0, 4.0, 7.0, 9.5}
    assert len(np.unique(back[:, 2])) > 21 and len(np.unique(back[:, 3])) > 21
    round_trip = again.inverse(again.forward(values))
    assert np.array_equal(round_trip[:, :2], values[:, :2]) and np.allclose(round_trip, values, atol=1e-5)



def test_a_small_table_of_measurements_is_not_taken_for_codes(rng):
    """Under 21 rows every column has at most DISCRETE_MAX_VALUES values; a column whose values
    are mostly seen once is a measurement all the same (12 rows came back as 17 recombinations
    of the training values). Codes in the same small table still snap: each value repeats."""
    values = np.column_stack([rng.normal(size=12), rng.permutation(np.tile([0, 1], 6)),
                              rng.permutation(np.tile([1, 2, 3], 4)), np.round(rng.normal(size=12), 1)])
    assert sorted(discrete_columns(values)) == [1, 2]
    # 40 heights to the centimetre: 20 distinct values, a quarter of the rows holding one seen once
    heights = np.array(list(range(160, 170)) + 3 * list(range(170, 180)), float)
    assert discrete_columns(heights[:, None]) == {}
    # a count column of 5000 rows with a few rare large counts stays a count
    counts = rng.poisson(3.0, 5000).astype(float)
    assert list(discrete_columns(counts[:, None])) == [0]

def test_yeo_johnson_power_is_scipys_maximum_likelihood_within_0_to_2(rng):
    """The golden-section search finds scipy.stats.yeojohnson_normmax's power (clipped to [0, 2],
    where the transform maps the line onto the line) on right-skewed, left-skewed and symmetric
    columns."""
    from scipy import stats
    for column in (rng.lognormal(0, 0.8, 2000), -rng.lognormal(0, 0.5, 2000), rng.normal(size=2000),
                   rng.gamma(2.0, 1.0, 2000), rng.lognormal(0, 1.5, 2000)):
        z = (column - column.mean()) / column.std()
        expected = float(np.clip(stats.yeojohnson_normmax(z), 0, 2))
        assert abs(yeo_johnson_power(z) - expected) < 1e-3


def _assert_decodes_and_jacobian_is_the_derivative(coding, values, rng):
    """The rows come back, every real number decodes to a finite value, and the log-Jacobian of
    20 rows matches central finite differences, column by column."""
    assert np.allclose(coding.inverse(coding.forward(values)), values, rtol=1e-9, atol=1e-9)
    assert np.isfinite(coding.inverse(rng.normal(scale=50, size=(100, values.shape[1])))).all()
    h, points = 1e-6, values[:20]
    numeric = sum(np.log((coding.forward(points + h * e) - coding.forward(points - h * e)) @ e / (2 * h))
                  for e in np.eye(values.shape[1]))
    assert np.allclose(coding.log_jacobian(points), numeric, atol=1e-5)


def test_power_coding_round_trips_and_its_jacobian_is_the_derivative(rng):
    """Skewed columns get powers away from 1 (below it for a right skew, above for a left skew),
    a symmetric one and the skipped ones keep 1; every real number decodes to a finite value, the
    rows come back, and the log-Jacobian matches finite differences. The coding survives the
    standardizer's dict (the checkpoint)."""
    values = np.column_stack([rng.lognormal(0, 0.8, 2000), -rng.lognormal(0, 0.5, 2000),
                              rng.normal(size=2000), rng.lognormal(0, 1.0, 2000)])
    coding = PowerCoding.fit(values, skip={3})
    assert coding.power[0] < 0.5 and coding.power[1] > 1.5 and coding.power[2] == 1 and coding.power[3] == 1
    _assert_decodes_and_jacobian_is_the_derivative(coding, values, rng)
    points = values[:20]
    scale = Standardizer.fit(values, coding=coding)
    again = Standardizer.from_dict(scale.to_dict())
    assert np.array_equal(again.forward(values), scale.forward(values))
    assert np.allclose(again.inverse(scale.forward(values)), values, rtol=1e-5)
    assert np.allclose(again.log_jacobian(points), scale.log_jacobian(points))
    assert PowerCoding.fit(rng.normal(size=(2000, 2))) is None  # nothing to code
    # two tight clusters, 80/20: skewed, but a power would squeeze one and stretch the other
    clusters = np.concatenate([rng.normal(-3, 0.15, 1600), rng.normal(3, 0.15, 400)])
    assert PowerCoding.fit(np.column_stack([clusters, values[:, 0]])).power.tolist()[0] == 1


def test_heavy_tailed_columns_get_a_tail_power_that_round_trips(rng):
    """A symmetric heavy-tailed column (Student-t, 3 degrees of freedom) has no skew for a power to
    straighten: its tails are pulled in by a tail power below 1 (sinh(δ asinh y)/δ), while a
    normal column and a log-normal one (its power does the work) keep tail 1. Every real number
    decodes, the rows come back, the log-Jacobian matches finite differences, and a stored coding
    without tails (checkpoints before them) reads as tail 1."""
    values = np.column_stack([rng.standard_t(3, 3000), rng.normal(size=3000), rng.lognormal(0, 0.8, 3000)])
    coding = PowerCoding.fit(values, tails=range(3))
    assert np.array_equal(PowerCoding.fit(values).tail, np.ones(3))  # tails only when asked
    assert coding.tail[0] < 0.5 and coding.tail[1] == 1 and coding.tail[2] == 1
    assert coding.power[0] == 1 and coding.power[2] < 0.5
    _assert_decodes_and_jacobian_is_the_derivative(coding, values, rng)
    again = coding_from_dict(coding.to_dict())
    assert np.array_equal(again.forward(values), coding.forward(values))
    untailed = coding_from_dict({key: value for key, value in coding.to_dict().items() if key != "tail"})
    assert np.array_equal(untailed.tail, np.ones(3))
