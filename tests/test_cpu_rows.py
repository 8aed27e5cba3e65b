"""The C++ CPU kernels' rows read in place (csrc/cpu/ce_cpu_forward.h, fwd_rows; bwd_rows): rows
of many classes swept in chunks (kernels.h, row_chunk: sized by the L1 data cache, or
NLLFUSED_CPU_CHUNK), bf16 rows in split order (ce_cpu_kernels.h, load2s), on every copy of the
kernels this machine can run, against the float64 oracle (tests/helpers.py)."""
import pytest
import torch

import nllfused
from helpers import check_cross_entropy
from test_stats import oracle_rows
from test_cpu_small_classes import CAPABILITIES, capability, dtype_id  # noqa: F401

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


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["rows", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=dtype_id)
def test_argmax_of_long_rows(capability, chunk, layout, dtype, scale):
    """The first of tied maxima wherever they fall -- in one vector step, in two steps of a
    chunk, in two chunks, in a chunk's scalar tail, in the same pair of a bf16 row's split order,
    a larger max in a later chunk, across the max sweep's 512-class snapshot blocks, only in the
    scalar tail, tied in a later chunk further into it than the max is into its own (rows copied
    scan the max's chunk from that chunk's snapshots) -- and the first NaN, on rows read in place
    (the fold finds the max's first class; where it does not test its steps -- a max in the
    scalar tail, at or above 2^22, positive below 2^-100, a NaN or inf -- a scan at the row's end
    does), rows copied with a logit_scale (bf16: in split order where the row is 64-byte aligned,
    rows 0 and 8: an odd class before an even one of its step) and tiles."""
    C = 5000
    x = torch.randn(15, C, dtype=torch.float64)
    top = x.abs().max() + 1
    places = [[5, 8], [40, 700], [2100, 4500], [3, 4997], [4990, 4999], [2047, 2048],
              [11, 12], [30, 3000]]
    for r, cols in enumerate(places):
        x[r, cols] = top
    x[7, 4000] = top + 1            # a larger max after a tie
    x[8, [2500, 100]] = float("nan")
    x[9, 1] = float("inf")
    x[9, 4321] = float("inf")
    x[10, [511, 512]] = top         # the last class of one snapshot block and the first of the next
    x[11, 4996] = top               # 5000 = 156 steps of 32 and a tail of 8
    x[12, [2148, 4896]] = top       # chunk 2048: block 0 of chunk 1, block 1 of chunk 2
    x[13, [3500, 600, 4100]] = 2.0 ** 23   # |max| >= 2^22: the fold does not test for it
    x[14] = -1 - x[14].abs()
    x[14, [4000, 900]] = 2.0 ** -110       # positive below 2^-100: nor for it
    x = x.to(dtype)
    if layout == "tiles":
        x = x.t().contiguous().t()  # classes strided
    t = torch.randint(0, C, (15,))
    _, st = nllfused.cross_entropy(x, t, reduction="none", backend="cpu", logit_scale=scale,
                                   return_stats=("predicted",))
    assert st.predicted.tolist() == [5, 40, 2100, 3, 4990, 2047, 11, 4000, 100, 1, 511, 4996,
                                     2148, 600, 900]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_argmax_at_negative_and_zero_maxima(capability, chunk, scale, dtype):
    """The first of tied maxima where the max is negative (every logit below 0: the bf16 max
    sweep's integer order does not hold) or zero, -0 and +0 tied (equal as floats, not as bits),
    with and without a logit transform (bf16 rows in split order)."""
    C = 3000
    x = -1 - torch.rand(4, C, dtype=torch.float64)
    x[0, [700, 40, 2999]] = -0.5
    x[1, [1800, 2900]] = -0.25
    x[2, [10, 2500]] = 0.0
    x[2, 7] = -0.0
    x[3, 2998] = -0.75
    x = x.to(dtype)
    t = torch.randint(0, C, (4,))
    _, st = nllfused.cross_entropy(x, t, reduction="none", backend="cpu", logit_scale=scale,
                                   return_stats=("predicted",))
    assert st.predicted.tolist() == [40, 1800, 7, 2998]
    assert torch.equal(st.predicted, (x.double() * scale).argmax(1))


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_rows_of_special_values(capability, chunk, stats, dtype):
    """Rows every fast path of the forward could get wrong, against float64 torch: bf16 rows
    without a transform take each chunk's max from the logits' bits (bits_max) -- all negative
    (its float fallback), zeros of both signs at the max, a -0 max alone, NaN of either sign,
    +inf, the max in the tail; and the fold's unmasked exp with tiny terms flushed (fold_steps,
    exp2_tiny) -- for float32 and 16-bit logits on AVX-512: terms below float32's normal range,
    and mask values (-inf, -1e20, -1e30, the dtype's lowest), which an exp without a mask can
    turn into inf or NaN. Rows of 4133 classes in a buffer of 4160 (each row 64-byte aligned, a
    tail of 5 classes)."""
    C = 4133
    g = torch.randn(11, C, dtype=torch.float64)
    x = g.clone()
    x[0] = -g[0].abs() - 1                          # every logit negative
    x[1] = -g[1].abs() - 1
    x[1, [300, 700, 4130]] = torch.tensor([-0.0, 0.0, 0.0], dtype=torch.float64)
    x[2] = -g[2].abs() - 1
    x[2, 100] = -0.0                                # a -0 max among negatives
    x[3, 1234] = float("nan")
    x[4, 77] = -float("nan")                        # sign bit set
    x[5, 2000:] = float("-inf")
    x[6, 5] = 95.0                                  # the others: exp(z - 95) < 2^-126
    x[7, 4131] = float("inf")                       # in the tail
    x[8, 4132] = 9.0                                # the max in the tail
    x[9] += 50.0
    x[10, :1000] = -1e20
    x[10, 1000:1010] = -1e30
    x[10, 3000:3100] = torch.finfo(dtype).min
    xb = torch.empty(11, 4160, dtype=dtype)[:, :C]
    xb.copy_(x)
    assert xb[4, 77].view(torch.int16 if xb.element_size() == 2 else torch.int32) < 0
    t = torch.randint(0, C, (11,))
    t[5] = 3
    t[10] = 2000
    finite = [0, 1, 2, 5, 6, 8, 9, 10]
    expected = oracle_rows(xb, t)
    if stats:
        loss, st = nllfused.cross_entropy(xb, t, reduction="none", backend="cpu",
                                          return_stats=("lse", "predicted", "entropy"))
        assert torch.equal(st.predicted, expected["predicted"])
        for name in ("lse", "entropy"):
            torch.testing.assert_close(getattr(st, name).double(), expected[name], rtol=2e-5,
                                       atol=2e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")
    else:
        loss = nllfused.cross_entropy(xb, t, reduction="none", backend="cpu")
    assert loss[[3, 4, 7]].isnan().all()
    xf = torch.empty(len(finite), 4160, dtype=dtype)[:, :C]  # aligned rows again
    xf.copy_(xb[finite])
    check_cross_entropy(xf, t[finite], "cpu", "cpu", reduction="none")


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_confident_rows(capability, chunk, aligned, dtype):
    """Rows whose target is the max by far, the other terms ~e^-20 each: the loss is their sum,
    ~1e-5, and only the count of classes at the max kept apart from it (State's k; for 16-bit
    logits on AVX-512 found by fold_steps' one compare per step) keeps its digits -- a class at
    the max added to a lane's sum rounds that lane's terms away. Also the max far from 0
    (|m| ~ 200: fold_steps' offset u(m), taken out of the sums), and tied maxima, one in the
    tail. The target's log-probability (float32 for every dtype) against float64 torch, within
    what float32 lane sums of ~260 terms each allow (2e-5; a class at the max in a lane costs
    ~3 %): 4 rows of 4133 classes, 64-byte aligned (bf16 read in place) or not (a converted
    chunk); the loss within its dtype's rounding."""
    C = 4133
    x = torch.randn(4, C, dtype=torch.float64) - 20
    x[1] += 200
    t = torch.tensor([17, 4000, 2500, 9])
    x[torch.arange(4), t] = torch.tensor([0.0, 200.0, 0.0, 0.0], dtype=torch.float64)
    x[2, [100, 4131]] = 0.0                                 # tied maxima
    x[3] += 15                                              # terms ~e^-5: an ordinary row
    buf = torch.empty(4, 4160 if aligned else C + 1, dtype=dtype)
    xb = buf[:, :C]
    xb.copy_(x)
    loss, st = nllfused.cross_entropy(xb, t, reduction="none", backend="cpu",
                                      return_stats=("target_logprob",))
    expected = torch.log_softmax(xb.double(), 1).gather(1, t[:, None]).squeeze(1)
    assert expected[0] > -1e-4 and expected[1] > -1e-4  # tiny: the test's point
    torch.testing.assert_close(st.target_logprob.double(), expected, rtol=2e-5, atol=0)
    info = torch.finfo(dtype)  # float16: ~1.4e-5 is subnormal, spaced tiny * eps
    torch.testing.assert_close(loss.double(), -expected, atol=info.tiny * info.eps,
                               rtol=2e-5 if dtype == torch.float32 else info.eps)


@pytest.mark.skipif("avx512" not in CAPABILITIES, reason="the CPU has no AVX-512")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_fold_offset_is_taken_out(monkeypatch, dtype):
    """float32 and 16-bit logits on AVX-512 (exp2_tiny): each term is 2^(z log2 e + o),
    o = -m log2 e rounded to float, whose rounding is a common factor of every term -- 1.0e-5
    relative at m = 184, the worst of the integers 128..255 -- that fold takes out of each
    chunk's sums. Confident rows at m = 184 (their loss is the other terms' sum): the target's
    log-probability within 3e-6 of float64 (~7e-7 measured; ~1e-5 without the correction)."""
    monkeypatch.setenv("NLLFUSED_CPU_CAPABILITY", "avx512")
    C = 4096
    x = torch.randn(8, C, dtype=torch.float64) + 164
    t = torch.randint(0, C, (8,))
    x[torch.arange(8), t] = 184.0
    xb = x.to(dtype)
    _, st = nllfused.cross_entropy(xb, t, reduction="none", backend="cpu",
                                   return_stats=("target_logprob",))
    expected = torch.log_softmax(xb.double(), 1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(st.target_logprob.double(), expected, rtol=3e-6, atol=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothing"])
def test_bf16_gradient_far_from_zero(capability, chunk, smoothing):
    """bf16 rows read in place (split order) take the backward's exp2 step on AVX-512 (grad_chunk's
    Exp2): p = 2^(z log2 e + c), c = -lse log2 e rounded to float, a rounding that is a factor
    common to the row (up to 0.5 % of p at |lse| ~ 1e5) and that the kernel takes out. Rows with
    k = 2, 3 or 5 classes tied at a max M between 2^12 and 2^17 and every other class 1000 below
    (p = 0): the tied classes' gradients are 1/k (times the smoothing's share) as float64 rounds
    it to bf16, the others' exactly that too. (Without the correction a quarter of such rows
    are off by an ulp.)"""
    N, C = 32, 4096
    M = (torch.rand(N, dtype=torch.float64) * (2**17 - 2**12) + 2**12).to(torch.bfloat16)
    x = (M.double()[:, None] - 1000).expand(N, C).to(torch.bfloat16).clone()
    t = torch.randint(0, C, (N,))
    for r in range(N):
        k = [2, 3, 5][r % 3]
        tied = torch.randperm(C)[:k]
        tied = tied[tied != t[r]]                     # the target stays off the max
        x[r, tied] = M[r]
    x.requires_grad_()
    loss = nllfused.cross_entropy(x, t, reduction="sum", label_smoothing=smoothing,
                                  backend="cpu")
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, t, reduction="sum", label_smoothing=smoothing)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert (grad.double() == ref_grad.to(torch.bfloat16).double()).all(), (
        (grad.double() - ref_grad).abs().max())


@pytest.mark.parametrize("scale", [1.0, -3.0, 2.0**-60, 2.0**-98, 2.0**-100, 2.0**-115,
                                   2.0**98, 2.0**100])
def test_bf16_gradient_at_any_upstream_scale(capability, chunk, scale):
    """bf16 rows read in place take the backward's exp2 step (grad_chunk's Exp2). On AVX2 the
    row's factor P (here the upstream gradient) goes into the polynomial's coefficients
    (exp2_scaled) where 2^-99 <= |P| <= 2^99, and the sum of the row's other p is divided by P
    again; the target's block is taken out of the loop. Upstream gradients of 1, -3, and tiny and
    huge ones on both sides of both bounds; targets in the first, second and a middle block, the
    last whole block of a 4096-class chunk, the tail; a confident row (its target's gradient
    from the other terms' sum). Every gradient within a bf16 rounding (2^-8 relative, and 1e-5
    for the exp) of float64 torch's, results under 2^-126 flushed (FlushTiny)."""
    N, C = 8, 4136                                  # 4096 classes, then 2 whole blocks and 8
    x = torch.randn(N, C, dtype=torch.float64) * 3
    t = torch.tensor([0, 15, 16, 2000, 4095, 4096, 4130, 4135])
    x[1, 15] = 30.0                                 # confident: 1 - p_y ~ 4e-8
    buf = torch.empty(N, 4160, dtype=torch.bfloat16)  # 64-byte aligned rows: split order
    xb = buf[:, :C].copy_(x).detach().requires_grad_()
    loss = nllfused.cross_entropy(xb, t, reduction="sum", backend="cpu")
    (grad,) = torch.autograd.grad(loss, xb, torch.tensor(scale, dtype=torch.bfloat16))
    x64 = xb.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x64, torch.tensor(scale, dtype=torch.float64))
    err = (grad.double() - ref_grad).abs()
    bound = ref_grad.abs() * (2.0**-8 + 1e-5) + 2.0**-126
    assert (err <= bound).all(), (err / bound).max()
    assert ref_grad[1, 15].abs() < 1e-6 * abs(scale)  # the confident row is one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight_smoothing", "probs", "stats"])
def test_every_tail_length(capability, option, dtype):
    """The fold's last, partial step (fold_steps: fewer than 2W classes, padded with the max, the
    pad lanes adding nothing and never counted at the max) and the max sweep's (chunk_max), for
    every tail length 2W can leave (rows of 385..416 classes: past the lane path's 384 for
    (N, C) rows, and every residue mod 32), 64-byte aligned rows (bf16 then read in place, the
    tail in class order after split-order steps): a row's max alone in the tail, tied maxima in
    it, -inf in it (the entropy's 0 * -inf rerun over the tail), a confident row whose target is
    in the tail; loss and gradient against float64 torch, and with statistics lse, entropy,
    target log-probability and argmax."""
    for C in range(385, 417):
        x = torch.randn(5, C, dtype=torch.float64) * 2
        x[1, -1] = 9.0                                   # the max alone, the last class
        x[2, [-1, -3]] = 8.0                             # tied maxima in the tail
        x[2, -2] = float("-inf")
        x[3] -= 20.0
        x[3, -2] = 0.0                                   # confident, the target in the tail
        x[4, C - C % 32:] = float("-inf")                # the whole tail (if any) at -inf
        buf = torch.empty(5, 448, dtype=dtype)
        xb = buf[:, :C]
        xb.copy_(x)
        t = torch.randint(0, C, (5,))
        t[3] = C - 2
        kw = dict(reduction="none")
        if option == "smoothing":
            kw["label_smoothing"] = 0.1
        elif option == "weight_smoothing":
            kw.update(label_smoothing=0.1, weight=torch.rand(C, dtype=torch.float64) + 0.1)
            if dtype != torch.float64:
                kw["weight"] = kw["weight"].float()
        if option == "probs":
            # (a probability of 0 at -inf: NaN in torch (0 * -inf), 0 here (csrc/ops.cpp))
            xb.masked_fill_(xb == float("-inf"), -1e4)
            check_cross_entropy(xb, torch.softmax(torch.randn(5, C), 1).to(dtype), "cpu", "cpu",
                                **kw)
        elif option == "stats":
            loss, st = nllfused.cross_entropy(
                xb, t, reduction="none", backend="cpu",
                return_stats=("lse", "predicted", "entropy", "target_logprob"))
            expected = oracle_rows(xb, t)
            assert torch.equal(st.predicted, expected["predicted"]), C
            for name in ("lse", "entropy", "target_logprob"):
                torch.testing.assert_close(getattr(st, name).double(), expected[name],
                                           rtol=2e-5, atol=2e-5,
                                           msg=lambda m: f"C={C} {name}: {m}")
        else:
            check_cross_entropy(xb, t, "cpu", "cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=dtype_id)
def test_rows_from_every_offset_in_a_line(capability, chunk, dtype):
    """Rows of 8 KiB or more that start off a 64-byte line (odd vocabularies: 50257 classes) take
    the classes before the next line as a chunk of their own (kernels.h, head_to_line), the rest
    in chunks starting on lines (bf16 then read in place, in split order). Rows starting at each
    element of a line, 4200 classes (two of the backward's 2048-class chunks and a rest after
    the head): the max, tied maxima and the target in the head or not, loss and gradient against
    float64 torch, statistics against float64 torch; then contiguous rows of an odd length
    (logits and gradient equally off their lines, every offset among the rows), with smoothing
    too."""
    size = torch.finfo(dtype).bits // 8
    C = 4200
    for off in range(64 // size):
        # below the planted maxima even rounded to bf16 (a 6-sigma 11.98 is 12.0 there: a tie,
        # which the first class wins)
        x = (torch.randn(4, C, dtype=torch.float64) * 2).clamp(-10.0, 10.0)
        x[0, 1] = 12.0                    # the max in the head (the first line, at off 0)
        x[1, [2, 1500]] = 12.0            # tied: the head's comes first
        x[2, 0], x[2, 4000] = 11.0, 12.0  # the head's max beaten in a later chunk
        x[3, -1] = 12.0                   # the max in the last chunk's tail
        t = torch.tensor([1, 0, 4000, 3])
        buf = torch.empty(4, 4256, dtype=dtype)  # whole lines a row: each row at offset `off`
        xb = buf[:, off:off + C]
        xb.copy_(x)
        check_cross_entropy(xb, t, "cpu", "cpu", reduction="none")
        _, st = nllfused.cross_entropy(
            xb, t, reduction="none", backend="cpu",
            return_stats=("lse", "predicted", "entropy", "target_logprob"))
        assert st.predicted.tolist() == [1, 2, 4000, C - 1], off
        expected = oracle_rows(xb, t)
        for name in ("lse", "entropy", "target_logprob"):
            torch.testing.assert_close(getattr(st, name).double(), expected[name], rtol=2e-5,
                                       atol=2e-5, msg=lambda m: f"offset {off} {name}: {m}")
    x = (torch.randn(33, 4111, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, 4111, (33,))
    for kw in ({}, {"label_smoothing": 0.1}):
        check_cross_entropy(x, t, "cpu", "cpu", reduction="none", **kw)
