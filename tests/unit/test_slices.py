"""Unit tests for jupyter_gpu_attach.slices: sizes and slice requests."""

import pytest

from jupyter_gpu_attach.slices import SliceRequest, format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * GiB),
        ("2GB", 2 * 1000**3),
        ("2gib", 2 * GiB),
        ("2 GiB", 2 * GiB),
        ("  512MiB  ", 512 * MiB),
        ("512MB", 512 * 1000**2),
        ("1.5GiB", int(1.5 * GiB)),
        ("8Gi", 8 * GiB),
        ("3g", 3 * 1000**3),
        ("1TiB", TiB),
        ("1TB", 1000**4),
        ("4KiB", 4 * KiB),
        ("4k", 4000),
        ("100", 100),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


def test_parse_size_binary_and_decimal_units_differ():
    assert parse_size("1GiB") - parse_size("1GB") == GiB - 1000**3 == 73741824


def test_parse_size_returns_int():
    assert type(parse_size("1.5GiB")) is int
    assert type(parse_size(7)) is int


@pytest.mark.parametrize("text", ["", "GiB", "2 gigabytes", "2XB", "-1GiB", "1,5GiB", "2 G i B", "1e3"])
def test_parse_size_rejects_garbage_and_names_the_fix(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    msg = str(e.value)
    assert "not a size" in msg
    assert repr(text) in msg
    # The message tells the user how to write it.
    assert "2GiB" in msg and "512MiB" in msg and "8GB" in msg


@pytest.mark.parametrize("value", [0, -5])
def test_parse_size_rejects_non_positive_ints(value):
    with pytest.raises(ValueError, match="positive"):
        parse_size(value)


@pytest.mark.parametrize("text", ["0", "0GiB", "0.5", "0.1B"])
def test_parse_size_rejects_less_than_one_byte(text):
    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_size(text)


@pytest.mark.parametrize("value", [True, False])
def test_parse_size_rejects_bool(value):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(value)


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (MiB, "1 MiB"),
        (1536 * MiB, "1.5 GiB"),
        (2 * GiB, "2 GiB"),
        (80 * GiB, "80 GiB"),
        (TiB, "1 TiB"),
        (3 * TiB + TiB // 2, "3.5 TiB"),
        (1000**3, "953.7 MiB"),
    ],
)
def test_format_size(n, expected):
    assert format_size(n) == expected


@pytest.mark.parametrize("text", ["2GiB", "512MiB", "1.5GiB", "3TiB", "7KiB"])
def test_format_parse_round_trip_for_binary_sizes(text):
    n = parse_size(text)
    assert parse_size(format_size(n).replace(" ", "")) == n


# -- SliceRequest ---------------------------------------------------------------------------


def test_default_request_is_one_whole_gpu():
    r = SliceRequest()
    assert r.is_default
    d = r.or_default()
    assert d == SliceRequest(gpus=1)
    assert not d.is_default


def test_or_default_keeps_pool():
    assert SliceRequest(pool="h100").or_default() == SliceRequest(gpus=1, pool="h100")


@pytest.mark.parametrize("r", [SliceRequest(gpus=2), SliceRequest(fraction=0.5), SliceRequest(memory=GiB, pool="a")])
def test_or_default_returns_explicit_request_unchanged(r):
    assert not r.is_default
    assert r.or_default() is r


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(gpus=1, fraction=0.5), "--gpus and --fraction"),
        (dict(gpus=1, memory=GiB), "--gpus and --memory"),
        (dict(fraction=0.5, memory=GiB), "--fraction and --memory"),
        (dict(gpus=1, fraction=0.5, memory=GiB), "--gpus and --fraction and --memory"),
    ],
)
def test_only_one_of_gpus_fraction_memory(kwargs, named):
    with pytest.raises(ValueError) as e:
        SliceRequest(**kwargs)
    assert "one of --gpus, --fraction, --memory or --mig" in str(e.value)
    assert named in str(e.value)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_gpus_in_range_accepted(gpus):
    assert SliceRequest(gpus=gpus).gpus == gpus


@pytest.mark.parametrize("gpus", [0, -1, 65, 1.5, "2"])
def test_gpus_out_of_range_rejected(gpus):
    with pytest.raises(ValueError, match="--gpus must be a whole number from 1 to 64"):
        SliceRequest(gpus=gpus)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 1, 1.0])
def test_fraction_in_range_accepted(fraction):
    assert SliceRequest(fraction=fraction).fraction == fraction


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, 2, float("nan")])
def test_fraction_out_of_range_rejected_and_points_to_gpus(fraction):
    with pytest.raises(ValueError) as e:
        SliceRequest(fraction=fraction)
    assert "--fraction must be in (0, 1]" in str(e.value)
    assert "--gpus N" in str(e.value)


@pytest.mark.parametrize("memory", [0, -1, 1.5, "2GiB"])
def test_memory_must_be_positive_int_bytes(memory):
    with pytest.raises(ValueError, match="--memory must be a positive size"):
        SliceRequest(memory=memory)


@pytest.mark.parametrize("pool", ["h100", "A100-80GB", "pool_1.x", "a" * 64])
def test_pool_label_accepted(pool):
    assert SliceRequest(pool=pool).pool == pool


@pytest.mark.parametrize("pool", ["", "has space", "a/b", "a" * 65, "ü", "x;y"])
def test_pool_label_rejected(pool):
    with pytest.raises(ValueError, match="--pool must be a label"):
        SliceRequest(pool=pool)


def test_request_is_frozen():
    r = SliceRequest(gpus=1)
    with pytest.raises(Exception):
        r.gpus = 2  # type: ignore[misc]


def test_from_options_parses_text():
    assert SliceRequest.from_options(memory="2GiB") == SliceRequest(memory=2 * GiB)
    assert SliceRequest.from_options(gpus="2") == SliceRequest(gpus=2)
    assert SliceRequest.from_options(fraction="0.25", pool="h100") == SliceRequest(fraction=0.25, pool="h100")
    assert SliceRequest.from_options() == SliceRequest()


def test_from_options_bad_memory_names_the_fix():
    with pytest.raises(ValueError, match="2GiB"):
        SliceRequest.from_options(memory="lots")


def test_to_json_omits_unset_fields():
    assert SliceRequest(fraction=0.5).to_json() == {"fraction": 0.5}
    assert SliceRequest(memory=GiB, pool="p").to_json() == {"memory": GiB, "pool": "p"}
    assert SliceRequest().to_json() == {}
    assert SliceRequest(**SliceRequest(gpus=3, pool="x").to_json()) == SliceRequest(gpus=3, pool="x")


@pytest.mark.parametrize(
    "r, text",
    [
        (SliceRequest(), "1 whole GPU"),
        (SliceRequest(gpus=1), "1 whole GPU"),
        (SliceRequest(gpus=4), "4 whole GPUs"),
        (SliceRequest(fraction=0.25), "0.25 of one GPU"),
        (SliceRequest(fraction=1.0), "1 of one GPU"),
        (SliceRequest(memory=2 * GiB), "2 GiB of one GPU"),
        (SliceRequest(memory=1536 * MiB), "1.5 GiB of one GPU"),
        (SliceRequest(pool="h100"), "1 whole GPU in pool 'h100'"),
        (SliceRequest(fraction=0.5, pool="a100"), "0.5 of one GPU in pool 'a100'"),
    ],
)
def test_describe(r, text):
    assert r.describe() == text
