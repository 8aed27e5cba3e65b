"""The C++ CPU kernels' rows read in place (csrc/cpu/ce_cpu_forward.h, fwd_rows; bwd_rows): rows
of many classes swept in chunks (kernels.h, row_chunk: sized by the L1 data cache, or
NLLFUSED_CPU_CHUNK), bf16 rows in split order (ce_cpu_kernels.h, load2s), on every copy of the
kernels this machine can run, against the float64 oracle (tests/helpers.py)."""
import pytest
import torch

import nllfused
from helpers import check_cross_entropy
from test_cpu_small_classes import capability, dtype_id  # noqa: F401 (capability: a fixture)

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")

# None: the machine's own chunk (build_info()["cpu_row_chunk"]); 64: many chunks per row, each
# with a rescale whenever its max beats the row's so far; 2048: the chunk of a 32 KiB L1d.
CHUNKS = [None, 64, 2048]


@pytest.fixture(params=CHUNKS, ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("NLLFUSED_CPU_CHUNK", raising=False)
    else:
        monkeypatch.setenv("NLLFUSED_CPU_CHUNK", str(request.param))
    return request.param


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},                          # g = 1: split order
    "weight_smoothing": {"label_smoothing": 0.1, "weight": True},   # g[]: class order
    "softcap": {"softcap": 20.0, "logit_scale": 1.5, "ignore_index": 3},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=dtype_id)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("C", [4096, 4099, 9000])
def test_chunked_rows(capability, chunk, C, option, dtype):
    """Rows of several chunks (C = 4096: every row 64-byte aligned, as the bf16 backward's split
    order asks; 4099: a scalar tail in every chunk size; 9000: more than the
    largest chunk), a rising max across chunks (the logits grow along the row)."""
    kw = dict(OPTIONS[option])
    N = 5
    x = (torch.randn(N, C, dtype=torch.float64) * 3
         + torch.linspace(0, 4, C, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, C, (N,))
    t[1] = kw.get("ignore_index", -100)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(C, dtype=torch.float64) + 0.1).to(
            torch.float64 if dtype == torch.float64 else torch.float32)
    check_cross_entropy(x, t, "cpu", "cpu", reduction="none", **kw)


@pytest.mark.parametrize("layout", ["rows", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=dtype_id)
def test_argmax_of_long_rows(capability, chunk, layout, dtype):
    """The first of tied maxima wherever they fall -- in one vector step, in two steps of a
    chunk, in two chunks, in a chunk's scalar tail, in the same pair of a bf16 row's split order,
    a larger max in a later chunk, across the max sweep's 512-class snapshot blocks, only in the
    scalar tail -- and the first NaN, on rows read in place and on tiles."""
    C = 5000
    x = torch.randn(12, C, dtype=torch.float64)
    top = x.abs().max() + 1
    places = [[5, 9], [40, 700], [2100, 4500], [3, 4997], [4990, 4999], [2047, 2048],
              [11, 12], [30, 3000]]
    for r, cols in enumerate(places):
        x[r, cols] = top
    x[7, 4000] = top + 1            # a larger max after a tie
    x[8, [2500, 100]] = float("nan")
    x[9, 1] = float("inf")
    x[9, 4321] = float("inf")
    x[10, [511, 512]] = top         # the last class of one snapshot block and the first of the next
    x[11, 4996] = top               # 5000 = 156 steps of 32 and a tail of 8
    x = x.to(dtype)
    if layout == "tiles":
        x = x.t().contiguous().t()  # classes strided
    t = torch.randint(0, C, (12,))
    _, st = nllfused.cross_entropy(x, t, reduction="none", backend="cpu",
                                   return_stats=("predicted",))
    assert st.predicted.tolist() == [5, 40, 2100, 3, 4990, 2047, 11, 4000, 100, 1, 511, 4996]


def test_row_chunk_from_the_cache(monkeypatch):
    """The machine's chunk is a power of two, 8 to 32 KiB of float32, and NLLFUSED_CPU_CHUNK
    sets it."""
    monkeypatch.delenv("NLLFUSED_CPU_CHUNK", raising=False)
    own = nllfused.build_info()["cpu_row_chunk"]
    assert own in (2048, 4096, 8192)
    monkeypatch.setenv("NLLFUSED_CPU_CHUNK", "192")
    assert nllfused.build_info()["cpu_row_chunk"] == 192


@pytest.mark.parametrize("bad", ["100", "0", "16384", "2k"])
def test_bad_chunk_is_refused_and_the_library_keeps_working(monkeypatch, bad):
    x = torch.randn(3, 5000)
    t = torch.randint(0, 5000, (3,))
    monkeypatch.setenv("NLLFUSED_CPU_CHUNK", bad)
    with pytest.raises(RuntimeError, match="NLLFUSED_CPU_CHUNK"):
        nllfused.cross_entropy(x, t, backend="cpu")
    monkeypatch.delenv("NLLFUSED_CPU_CHUNK")
    torch.testing.assert_close(nllfused.cross_entropy(x, t, backend="cpu"),
                               torch.nn.functional.cross_entropy(x, t))
