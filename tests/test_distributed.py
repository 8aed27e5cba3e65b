"""nllfused.distributed.vocab_parallel_cross_entropy against float64 torch on the full vocabulary.

Multi-process tests: gloo on the CPU at world sizes 2 and 4 (one launch per world size runs the
whole matrix, to keep process start-up cheap), NCCL on the GPU (`gpu`). Each rank builds the
same full-vocabulary problem from a shared seed, takes its slice (even, uneven, or out of rank
order), and compares its loss and its slice of the gradient with the float64 oracle of
tests/reference.py. A dispatch mode counts the collectives each forward and backward issues.
"""
import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import nllfused
from helpers import backends_here, tensors_to
from nllfused.distributed import vocab_parallel_cross_entropy
from reference import assert_matches_oracle, reference

REDUCTIONS = ("none", "mean", "sum")
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")
NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


class CollectiveCounter(TorchDispatchMode):
    """Records every collective op dispatched while active, with its input's element count,
    whatever API issued it (torch.distributed, functional collectives, process-group methods)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if func.namespace in COLLECTIVE_NAMESPACES and not any(n in name for n in NOT_COLLECTIVES):
            first = args[0] if args else None
            if isinstance(first, (list, tuple)):
                first = first[0] if first else None
            self.calls.append((name, first.numel() if isinstance(first, torch.Tensor) else None))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# The cases: the full problem, then each rank's slice of it
# --------------------------------------------------------------------------------------------

def even(world, per_rank):
    return [per_rank] * world, False


def uneven(world):
    return ([3, 8], True) if world == 2 else ([1, 6, 2, 9], True)


# name -> (slices(world) -> (sizes per rank, explicit vocab_start), leading shape, dtype,
#          kwargs, builder tweak)
def _plain(x, t, gen):
    return x, t


def _masked(x, t, gen):
    C = x.shape[-1]
    mask = torch.rand(x.shape, generator=gen) < 0.3
    flat_t = t.reshape(-1, 1).clamp(min=0)
    mask.view(-1, C).scatter_(1, flat_t, False)
    x = x.masked_fill(mask, float("-inf"))
    x.view(-1, C)[0, :-1] = float("-inf")  # row 0: every slice but the last entirely masked
    t.view(-1)[0] = C - 1
    return x, t


def _extreme(x, t, gen):
    x = x + 1e4
    x.view(-1, x.shape[-1])[1] *= 1e4 / 3
    return x, t


def _far(x, t, gen):
    # float64 rows on an offset of 3e7, p far from one-hot: the ranks' lse's own rounding there
    # (ulp 7.5e-9) must enter neither the loss nor p (docs/maths.md, "Precision of lse")
    return x.double() + 3e7, t


def _confident(x, t, gen):
    flat = x.view(-1, x.shape[-1])
    flat[torch.arange(flat.shape[0]), t.view(-1).clamp(min=0)] += 30
    return x, t


def _all_ignored(x, t, gen):
    return x, torch.full_like(t, -100)


CASES = {
    # How the vocabulary is split (even, uneven with vocab_start given, out of rank order),
    # the options spread over the splits.
    "even": (lambda w: even(w, 5), (6,), torch.float32, {}, _plain),
    "even_f64": (lambda w: even(w, 4), (5,), torch.float64,
                 {"label_smoothing": 0.1, "weight": True}, _plain),
    "uneven_all_options": (uneven, (7,), torch.float32,
                           {"label_smoothing": 0.2, "z_loss": 1e-2, "weight": True}, _plain),
    "uneven_ignore_valid_class": (uneven, (8,), torch.float32,
                                  {"ignore_index": 2, "label_smoothing": 0.1}, _plain),
    "reversed_slices_3d": ("reversed", (2, 3), torch.float32, {"label_smoothing": 0.1}, _plain),
    # Hard numerics across slices: -inf (whole slices of a row), offset and spread, p_y -> 1.
    "masked": (uneven, (6,), torch.float32, {}, _masked),
    # a slice entirely at -inf whose class weights include a 0: the smoothing sum is 0 * inf,
    # NaN as torch's (class 0, the first rank's, weighs 0)
    "masked_zero_weight": (uneven, (6,), torch.float32,
                           {"label_smoothing": 0.1, "weight": "zero_first"}, _masked),
    "extreme": (uneven, (5,), torch.float32, {"label_smoothing": 0.1}, _extreme),
    "far_f64": (uneven, (6,), torch.float64, {"label_smoothing": 0.1, "weight": True}, _far),
    "confident_bf16": (lambda w: even(w, 6), (5,), torch.bfloat16, {}, _confident),
    "long_rows": (lambda w: even(w, 4100), (2,), torch.float32,  # > one block per slice
                  {"label_smoothing": 0.1, "weight": True}, _plain),
    # Edges: smoothing 1, nothing counted, no rows.
    "smoothing_1": (lambda w: even(w, 3), (4,), torch.float32, {"label_smoothing": 1.0}, _plain),
    "all_ignored": (lambda w: even(w, 3), (4,), torch.float32, {}, _all_ignored),
    "empty": (lambda w: even(w, 3), (0,), torch.float32, {"label_smoothing": 0.1}, _plain),
}


def _slices(spec, world):
    """[(vocab_start, C_local)] per rank, and whether vocab_start must be passed."""
    if spec == "reversed":  # rank r holds the r-th slice from the END of the vocabulary
        sizes = [2 + r for r in range(world)]
        starts = [sum(sizes[r + 1:]) for r in range(world)]
        return list(zip(starts, sizes)), True
    sizes, explicit = spec(world)
    starts = [sum(sizes[:r]) for r in range(world)]
    return list(zip(starts, sizes)), explicit


def _build(name, world, seed, device):
    spec, lead, dtype, kwargs, tweak = CASES[name]
    slices, explicit = _slices(spec, world)
    C = sum(size for _, size in slices)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=gen) * 3
    t = torch.randint(0, C, lead, generator=gen)
    t[torch.rand(lead, generator=gen) < 0.2] = kwargs.get("ignore_index", -100)
    x, t = tweak(x, t, gen)
    kwargs = dict(kwargs)
    if kwargs.get("weight"):
        zero_first = kwargs["weight"] == "zero_first"
        kwargs["weight"] = torch.rand(C, generator=gen) + 0.1
        if zero_first:
            kwargs["weight"][0] = 0.0
    return x.to(dtype), t, kwargs, slices, explicit, gen


def _check_case(name, rank, world, seed, device, backend, failures, group=None):
    """rank and world within `group` (None: the default group)."""
    x, t, kwargs, slices, explicit, gen = _build(name, world, seed, device)
    start, size = slices[rank]
    dtype = x.dtype
    C = x.shape[-1]
    # The reductions are the same torch ops after either backend's per-row losses: the kernels
    # are checked through 'none' (random per-row upstream gradients), plus 'mean' once.
    reductions = REDUCTIONS if backend != "triton" else (
        ("none", "mean") if name == "uneven_all_options" else ("none",))
    for reduction in reductions:
        what = f"[rank {rank}/{world}{'' if group is None else ' subgroup'} {backend} {name} " \
               f"{reduction}]"
        try:
            out_shape = t.shape if reduction == "none" else ()
            # Rounded to the loss's dtype: the gradient the loss receives (tests/helpers.py).
            grad = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).double()
            ref_kw = dict(kwargs, reduction=reduction)
            # The oracle: torch on the full vocabulary, (rows, C) and rows.
            oracle, oracle_grad = reference(x.reshape(-1, C), t.reshape(-1), grad=grad.reshape(-1)
                                            if reduction == "none" else grad, **ref_kw)
            low = low_grad = None
            if dtype != torch.float64:
                low, low_grad = reference(x.reshape(-1, C), t.reshape(-1), dtype=dtype,
                                          grad=grad.reshape(-1) if reduction == "none" else grad,
                                          **ref_kw)
                low, low_grad = low.reshape(out_shape), low_grad.reshape(x.shape)[..., start:start
                                                                                  + size]
            oracle = oracle.reshape(out_shape)
            oracle_grad = oracle_grad.reshape(x.shape)[..., start:start + size]

            mine = x[..., start:start + size].to(device).requires_grad_()
            loss = vocab_parallel_cross_entropy(
                mine, t.to(device), reduction=reduction, backend=backend, group=group,
                vocab_start=start if explicit else None, **tensors_to(kwargs, device))
            assert loss.dtype == dtype and loss.shape == oracle.shape, what + " dtype/shape"
            assert_matches_oracle(loss, oracle, dtype, low, what + " loss")
            loss.backward(grad.to(device, dtype))
            assert mine.grad.dtype == dtype and mine.grad.shape == mine.shape
            assert_matches_oracle(mine.grad, oracle_grad, dtype, low_grad, what + " grad")
        except Exception:
            failures.append(what + "\n" + traceback.format_exc())


def _check_stats(rank, world, seed, device, backend, failures):
    """return_stats over the full vocabulary (entropy, argmax, target log-prob, lse, z-loss term,
    accuracy) and the gradients of entropy and target log-prob on each rank's slice equal
    nllfused.cross_entropy's on the full logits (tests/test_stats.py checks those against float64
    torch), with ties, a NaN and an all -inf row among the rows; and again on an offset of 3e8
    (float64 rows far from zero: no lse's own rounding may reach the entropy, log p_y or p)."""
    gen = torch.Generator().manual_seed(seed)
    slices, _ = _slices(uneven, world)
    C = sum(size for _, size in slices)
    x = torch.randn(7, C, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, C, (7,), generator=gen)
    t[2] = -100
    x[0, [C - 1, 1]] = 9.0          # a tie across ranks: the smaller id
    x[3, C - 2] = float("nan")
    x[4] = float("-inf")
    start, size = slices[rank]
    x_base, t_all = x, t
    for offset, reduction in [(o, r) for o in (0.0, 3e8) for r in REDUCTIONS]:
        x_all = x_base + offset
        what = f"[rank {rank}/{world} {backend} stats {reduction} offset {offset:g}]"
        # Reduced, the NaN and -inf rows would make every value NaN: those rows only for 'none'.
        x, t = (x_all, t_all) if reduction == "none" else (x_all[[0, 1, 2, 5, 6]],
                                                           t_all[[0, 1, 2, 5, 6]])
        try:
            full = x.clone().requires_grad_()
            ref_loss, ref = nllfused.cross_entropy(full, t, reduction=reduction, backend="torch",
                                                   z_loss=1e-3, return_stats=True)
            mine = x[:, start:start + size].clone().to(device).requires_grad_()
            loss, st = vocab_parallel_cross_entropy(mine, t.to(device), reduction=reduction,
                                                    backend=backend, z_loss=1e-3,
                                                    vocab_start=start, return_stats=True)
            for name in ref._fields:
                a, b = getattr(st, name), getattr(ref, name)
                assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name} dtype/shape"
                torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9, equal_nan=True,
                                           msg=lambda m: f"{what} {name}: {m}")
            g_h = torch.randn(st.entropy.shape, generator=gen, dtype=torch.float64)
            g_t = torch.randn(st.target_logprob.shape, generator=gen, dtype=torch.float64)
            keep = torch.isfinite(ref.entropy)
            (torch.where(keep, g_h * ref.entropy, 0.0).sum()
             + torch.where(keep, g_t * ref.target_logprob, 0.0).sum()).backward()
            (torch.where(keep.to(device), g_h.to(device) * st.entropy, 0.0).sum()
             + torch.where(keep.to(device), g_t.to(device) * st.target_logprob, 0.0).sum()
             ).backward()
            rows = keep if keep.dim() else torch.ones(len(t), dtype=torch.bool)
            torch.testing.assert_close(mine.grad.cpu()[rows],
                                       full.grad[:, start:start + size][rows], rtol=1e-9,
                                       atol=1e-9, msg=lambda m: f"{what} grad: {m}")
        except Exception:
            failures.append(what + "\n" + traceback.format_exc())


def _check_collectives(rank, world, device, backend, failures):
    """One all-gather of O(rows) numbers per forward (3 a row, 4 with smoothing: the slice's
    logsumexp as max + log-sum, the target logit, the smoothing sum), nothing in backward."""
    what = f"[rank {rank}/{world} {backend} collectives]"
    N, size = 9, 4
    for kwargs in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
        for reduction in REDUCTIONS:
            x = torch.randn(N, size, device=device, requires_grad=True)
            t = torch.randint(0, size * world, (N,), device=device)
            with CollectiveCounter() as fwd:
                loss = vocab_parallel_cross_entropy(x, t, reduction=reduction, backend=backend,
                                                    **kwargs)
            with CollectiveCounter() as bwd:
                loss.backward(torch.ones_like(loss))
            ok = (len(fwd.calls) == 1 and "all_gather" in fwd.calls[0][0]
                  and fwd.calls[0][1] <= (4 if kwargs else 3) * N + 3 and not bwd.calls)
            if not ok:
                failures.append(f"{what} {kwargs} {reduction}: forward issued {fwd.calls}, "
                                f"backward issued {bwd.calls}")


def _check_bad_tiling(rank, world, device, failures):
    """Overlapping slices are caught (CPU: ValueError on every rank, after the one collective)."""
    x = torch.randn(4, 3, device=device)
    t = torch.randint(0, 3 * world, (4,), device=device)
    try:
        vocab_parallel_cross_entropy(x, t, vocab_start=0, backend="torch")
    except ValueError as exc:
        if "tile" not in str(exc):
            failures.append(f"[rank {rank} bad tiling] unexpected message: {exc}")
    else:
        failures.append(f"[rank {rank} bad tiling] no error for overlapping slices")
    # A weight one class short, past the end of the last rank's slice only: every rank raises
    # (an error on that rank alone, before the collective, left the others waiting in it).
    try:
        vocab_parallel_cross_entropy(x, t.clamp(max=3 * world - 2), backend="torch",
                                     weight=torch.ones(3 * world - 1, device=device))
    except ValueError as exc:
        if "full-vocabulary" not in str(exc):
            failures.append(f"[rank {rank} short weight] unexpected message: {exc}")
    else:
        failures.append(f"[rank {rank} short weight] no error")


def _check_compile(rank, world, seed, device, backend, failures):
    """torch.compile(fullgraph) traces the functional collective (and the Triton ops' fakes):
    the same loss and gradient as eager."""
    def step(x, t):
        return vocab_parallel_cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3,
                                            backend=backend)
    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(5, 4, generator=gen).to(device)
        t = torch.randint(0, 4 * world, (5,), generator=gen).to(device)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = step(xe, t)
        eager.backward()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(xc, t)
        compiled.backward()
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(xc.grad, xe.grad)
    except Exception:
        failures.append(f"[rank {rank} {backend} compile]\n" + traceback.format_exc())


def _worker(rank, world, init_file, seed, dist_backend, device, backends, compile_check):
    torch.set_num_threads(1)  # world-size processes share the machine's cores
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(dist_backend, init_method="file://" + init_file, rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    failures = []
    try:
        for i, name in enumerate(CASES):
            for backend in backends:
                _check_case(name, rank, world, seed + i, device, backend, failures)
        for backend in backends:
            _check_collectives(rank, world, device, backend, failures)
            _check_stats(rank, world, seed, device, backend, failures)
        if world == 4:  # two groups of two inside the world: group ranks != global ranks
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            for backend in backends:
                _check_case("uneven_all_options", rank % 2, 2, seed, device, backend, failures,
                            group=pairs[rank // 2])
        if device == "cpu":
            _check_bad_tiling(rank, world, device, failures)
        if compile_check:  # on the CPU via torch: the interpreter cannot run under compile
            _check_compile(rank, world, seed, device,
                           "torch" if device == "cpu" else backends[0], failures)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"{len(failures)} failure(s):\n" + "\n".join(failures))


def _launch(world, dist_backend, device, backends, compile_check=False, start_method="spawn"):
    seed = torch.randint(0, 2 ** 30, ()).item()  # fresh each run (conftest seeds torch)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), seed, dist_backend,
                                          device, backends, compile_check),
                           nprocs=world, join=True, start_method=start_method)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

# Not "cpu": there are no C++ vocabulary-parallel kernels, the name runs the torch implementation.
CPU_BACKENDS = backends_here("cpu", only=("torch", "triton"))


# Two ranks, and four (uneven slices of four sizes, and subgroups inside the world). Four
# processes on a small machine take ~25 s: slow.
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_matches_full_vocabulary(world):
    """Losses and each rank's gradient slice equal the full-vocabulary oracle; one collective."""
    _launch(world, "gloo", "cpu", CPU_BACKENDS, compile_check=world == 2)


@pytest.mark.gpu
def test_nccl_matches_full_vocabulary():
    """NCCL over every GPU (at most 4); world size 1 on a single-GPU machine."""
    world = min(torch.cuda.device_count(), 4)
    # triton first: the compile check runs the first backend.
    _launch(world, "nccl", "cuda", backends_here("cuda", only=("triton", "torch")),
            compile_check=True)


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_process_group_equals_cross_entropy(backend, reduction):
    """torch.distributed not initialized: a group of one, no communication."""
    C = 11
    x = torch.randn(2, 3, C) * 3
    t = torch.randint(0, C, (2, 3))
    t[0, 1] = -100
    w = torch.rand(C) + 0.1
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, reduction=reduction)
    grad = torch.randn(t.shape if reduction == "none" else ())
    xa = x.clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(xa, t, backend=backend, **kw)
    ours.backward(grad)
    xb = x.reshape(-1, C).clone().requires_grad_()
    theirs = nllfused.cross_entropy(xb, t.reshape(-1), backend="torch", **kw)
    theirs.backward(grad.reshape(-1) if reduction == "none" else grad)
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad.reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_gives_float32_as_cross_entropy(backend, reduction):
    """Under autocast a 16-bit slice's loss is float32, as nllfused.cross_entropy's and torch's
    (not rounded to the logits' dtype)."""
    x = torch.randn(6, 10, dtype=torch.bfloat16) * 3
    t = torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = vocab_parallel_cross_entropy(x, t, backend=backend, reduction=reduction)
        theirs = nllfused.cross_entropy(x, t, backend="torch", reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("stats", [False, True], ids=["loss", "stats"])
def test_differentiable_once(backend, stats):
    """create_graph=True gives the first-order gradient; differentiating that gradient again
    raises (it would need the all-gathered lse's own gradient), never a wrong number."""
    x = (torch.randn(4, 7, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randint(0, 7, (4,))
    out = vocab_parallel_cross_entropy(x, t, backend=backend, label_smoothing=0.1,
                                       return_stats=stats)
    loss = out[0] + out[1].entropy.sum() if stats else out
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    xr = x.detach().clone().requires_grad_()
    ref = nllfused.cross_entropy(xr, t, backend="torch", label_smoothing=0.1, return_stats=stats)
    (ref[0] + ref[1].entropy.sum() if stats else ref).backward()
    torch.testing.assert_close(g.detach(), xr.grad)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (g * torch.randn_like(g)).sum().backward()


def test_argument_errors():
    x = torch.randn(4, 5)
    t = torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="class indices"):
        vocab_parallel_cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="tile.*full-vocabulary"):  # after the collective
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="1-D"):
        vocab_parallel_cross_entropy(x, t, weight=torch.ones(5, 1))
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_cross_entropy(x, t, vocab_start=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        vocab_parallel_cross_entropy(x, t, backend="fast")
    with pytest.raises(IndexError, match="out of bounds"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="tile"):  # alone in the world, the slice must start at 0
        vocab_parallel_cross_entropy(x, t, vocab_start=2, weight=torch.ones(7))
    with pytest.raises(RuntimeError, match="not initialized"):
        vocab_parallel_cross_entropy(x, t, group=object())


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_rows_get_no_gradient_from_reduced_statistics(backend, reduction):
    """As nllfused.cross_entropy (tests/test_autograd_modes.py): a reduced entropy or target
    log-prob weighs only the counted rows, so an ignored row of NaN / +inf / all -inf logits
    gets gradient 0 from them (no 0 times its NaN p); the counted rows' is float64 torch's."""
    x = torch.randn(5, 6, dtype=torch.float64)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    t = torch.tensor([-100, -100, -100, 1, 4])
    xd = x.clone().requires_grad_()
    loss, st = vocab_parallel_cross_entropy(xd, t, reduction=reduction, backend=backend,
                                            return_stats=("entropy", "target_logprob"))
    (g,) = torch.autograd.grad(loss + 0.3 * st.entropy - 0.7 * st.target_logprob, xd)
    assert torch.equal(g[:3], torch.zeros(3, 6, dtype=torch.float64))
    xr = x[3:].clone().requires_grad_()
    logp = torch.log_softmax(xr, 1)
    agg = torch.mean if reduction == "mean" else torch.sum
    ref = (torch.nn.functional.cross_entropy(xr, t[3:], reduction=reduction)
           + 0.3 * agg(-(logp.exp() * logp).sum(1))
           - 0.7 * agg(logp.gather(1, t[3:, None]).squeeze(1)))
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(g[3:], gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backends_here("cpu"))
def test_entropy_gradient_of_a_row_with_inf_is_nan_as_torch(backend):
    """A row holding +inf has entropy NaN; torch's autograd of -(p log p).sum gives its whole
    row NaN, and so must the vocabulary-parallel backward (not NaN at the +inf class alone);
    the other rows are float64 torch's."""
    x = torch.randn(3, 6, dtype=torch.float64)
    x[1, 3] = float("inf")
    t = torch.tensor([0, 2, 5])
    xd = x.clone().requires_grad_()
    _, st = vocab_parallel_cross_entropy(xd, t, reduction="none", backend=backend,
                                         return_stats="entropy")
    (g,) = torch.autograd.grad(st.entropy.sum(), xd)
    xr = x.clone().requires_grad_()
    logp = torch.log_softmax(xr, 1)
    (gr,) = torch.autograd.grad(-(logp.exp() * logp).sum(), xr)
    assert gr[1].isnan().all()
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", backends_here("cpu"))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_row_with_inf_gives_nan_loss_as_torch(backend, smoothing):
    """A +inf logit, at the target or not, makes torch's log_softmax and so the loss, the target
    log-prob and the whole row's gradient NaN (inf - inf), while its lse is +inf (the rows' lse
    is torch.logsumexp's): not an inf loss from lse - z_y."""
    x = torch.randn(4, 6, dtype=torch.float64)
    x[0, 3] = float("inf")
    x[1, 2] = float("inf")
    x[2, [1, 4]] = float("inf")
    x[3, 0] = float("inf")
    x[3, 5] = float("nan")  # lse NaN
    t = torch.tensor([1, 2, 0, 5])
    xd = x.clone().requires_grad_()
    loss, st = vocab_parallel_cross_entropy(xd, t, reduction="none", backend=backend,
                                            label_smoothing=smoothing,
                                            return_stats=("target_logprob", "lse"))
    loss.backward(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr, t, reduction="none", label_smoothing=smoothing)
    ref.backward(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
    assert ref.isnan().all() and xr.grad.isnan().all()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(xd.grad, xr.grad, rtol=1e-10, atol=1e-12, equal_nan=True)
    logp = torch.log_softmax(x, 1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(st.target_logprob, logp, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(st.lse, torch.logsumexp(x, 1), rtol=1e-10, atol=1e-12,
                               equal_nan=True)
