"""The SafeGrad kernel reads fp16 right when the host flushes denormals
(torch.set_flush_denormal(True), which sets FTZ/DAZ in the calling thread): every fp16 value read
exactly as torch reads it with flushing off, and a projection of small fp16 gradients equal to a
float64 reference, on every conversion path this CPU has."""
import pytest
import torch

from safehook import _core

PATHS = []
for _name in ("scalar", "avx2", "avx2+f16c"):
    try:
        _core.safegrad_path(_name)
        PATHS.append(_name)
    except ValueError:
        pass
_core.safegrad_path("best")


@pytest.fixture
def flush_denormal():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert torch.tensor([1e-40]).mul(1.0).item() == 0.0  # flushing is on in this thread
        yield
    finally:
        torch.set_flush_denormal(False)
        _core.safegrad_path("best")


def all_fp16():
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)


@pytest.mark.parametrize("path", PATHS)
def test_every_fp16_value_read_as_torch_reads_it(path, flush_denormal):
    h = all_fp16()
    torch.set_flush_denormal(False)
    want = h.float()  # torch's own conversion, flushing off
    torch.set_flush_denormal(True)
    _core.safegrad_path(path)
    # pass 2 with coef -1 on an fp32 task gradient of -0.0 writes -0.0 - (-1 * s) = s, the value
    # read (with its sign when s is a zero)
    got = torch.full((65536,), -0.0, dtype=torch.float32)
    assert _core.safegrad_update([got], [h], [-1.0]) == []
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bad = (got.view(torch.int32) != want.view(torch.int32)) & ~nan
    assert not bad.any(), "fp16 %s read as %r, torch: %r" % (
        [hex(i) for i in bad.nonzero().flatten()[:5].tolist()], got[bad][:5].tolist(), want[bad][:5].tolist())
    assert int((want != 0).logical_and(want.abs() < 2 ** -14).sum()) == 2 * 1023  # the subnormals were in


@pytest.mark.parametrize("path", PATHS)
def test_fp16_projection_matches_float64_under_flush_denormal(path, flush_denormal):
    gen = torch.Generator().manual_seed(11)
    # gradients of the size where fp16 is mostly subnormal (below 2^-14 ~ 6.1e-5)
    g = [(torch.randn(n, generator=gen) * 2e-5).half() for n in (3000, 1500, 777)]
    s = [(torch.randn(x.numel(), generator=gen) * 2e-5 - 0.8 * x.float()).half() for x in g]
    torch.set_flush_denormal(False)
    g64 = [x.double() for x in g]
    s64 = [x.double() for x in s]
    torch.set_flush_denormal(True)
    assert sum(int(((x != 0) & (x.float().abs() < 2 ** -14)).sum()) for x in g) > 2000  # mostly subnormal
    gs = sum(float(a @ b) for a, b in zip(g64, s64))
    ss = sum(float(b @ b) for b in s64)
    gg = sum(float(a @ a) for a in g64)
    cos = gs / (gg * ss) ** 0.5
    assert cos < -0.3  # they conflict, so the kernel projects
    _core.safegrad_path(path)
    dots, coefs, cosines, n = _core.safegrad_project(g, s)
    assert n == 1
    assert dots[0] == pytest.approx(gs, rel=1e-5)
    assert dots[1] == pytest.approx(ss, rel=1e-5)
    assert dots[2] == pytest.approx(gg, rel=1e-5)
    assert cosines[0] == pytest.approx(cos, abs=1e-5)
    c = gs / ss
    for got, a, b in zip(g, g64, s64):
        want = a - c * b
        # one fp16 rounding of the result: half a unit at 2^-24 below 2^-14, relative above
        tol = torch.maximum(want.abs() * 2.0 ** -11, torch.full_like(want, 2.0 ** -25))
        err = (got.double() - want).abs()
        assert bool((err <= tol * 1.01).all()), float((err / tol).max())
