"""GPU check of the Mamba2 decode-step kernels: Triton vs torch path on full-size shapes, with timings.

    python -m bench.kernel_check            # check + table
    python -m bench.kernel_check --sweep    # also time other Triton block sizes

Shapes are Nemotron Nano 12B v2's Mamba layers: H=128 heads of P=80, N=128, G=8 groups, conv over
C = 10240 + 2*8*128 channels with K=4; a pool of S=64 slots, bf16 activations and conv state, fp32 SSM state.
Each step updates B permuted slots of the pool. GB/s counts the state read and written plus every input and
output tensor once. Times are the median of 50 replays after warm-up, each timed with CUDA events
(per call from a CUDA graph of 20 calls, which is what a graph-replayed decode step pays; the eager time of
one launch, mostly host launch overhead at these sizes, is shown beside it).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from model import kernels

H, P, N, G, K, S = 128, 80, 128, 8, 4, 64
INNER = H * P
CONV_DIM = INNER + 2 * G * N
BATCHES = (1, 16, 64)
ACT = torch.bfloat16


def _time_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def _graph_ms(fn, repeat: int = 20) -> float:
    """GPU time of one call: `repeat` calls captured in a CUDA graph, replayed, divided by `repeat`.

    Eager timing of a single small launch measures Python/Triton launch overhead (the GPU idles between the
    events); the engine replays decode steps as CUDA graphs, so this is the number that bounds it.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return _time_ms(graph.replay) / repeat


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _inputs(batch: int, gen: torch.Generator):
    dev = "cuda"
    row = torch.randn(batch, CONV_DIM, generator=gen, device=dev).to(ACT)  # conv output: x | B | C
    x = row[:, :INNER].view(batch, H, P)
    Bm = row[:, INNER:INNER + G * N].view(batch, G, N)
    Cm = row[:, INNER + G * N:].view(batch, G, N)
    return dict(
        conv_x=torch.randn(batch, CONV_DIM, generator=gen, device=dev).to(ACT),
        conv_state=torch.randn(S, CONV_DIM, K - 1, generator=gen, device=dev).to(ACT),
        conv_w=(torch.randn(CONV_DIM, K, generator=gen, device=dev) * 0.5).to(ACT),
        conv_b=(torch.randn(CONV_DIM, generator=gen, device=dev) * 0.5).to(ACT),
        x=x, B=Bm, C=Cm,
        dt=torch.randn(batch, H, generator=gen, device=dev).to(ACT),
        A=-torch.exp(torch.randn(H, generator=gen, device=dev)),
        D=torch.randn(H, generator=gen, device=dev).to(ACT),
        dt_bias=torch.randn(H, generator=gen, device=dev).to(ACT),
        ssm_state=torch.randn(S, H, P, N, generator=gen, device=dev),
        slots=torch.randperm(S, generator=gen, device=dev)[:batch],
    )


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(batch: int, gen: torch.Generator) -> dict:
    t = _inputs(batch, gen)
    slots = t["slots"]

    # Correctness: the two paths on identical copies of the pools.
    cs_tri, cs_ref = t["conv_state"].clone(), t["conv_state"].clone()
    out_tri = kernels.conv_update_triton(t["conv_x"], cs_tri, t["conv_w"], t["conv_b"], slots)
    out_ref = kernels.conv_update_torch(t["conv_x"], cs_ref, t["conv_w"], t["conv_b"], slots)
    ss_tri, ss_ref = t["ssm_state"].clone(), t["ssm_state"].clone()
    ssm_args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"])
    y_tri = kernels.ssm_update_triton(*ssm_args, ss_tri, slots)
    y_ref = kernels.ssm_update_torch(*ssm_args, ss_ref, slots)
    errs = dict(conv_out=_max_err(out_tri, out_ref) / max(out_ref.float().abs().max().item(), 1e-6),
                conv_state=_max_err(cs_tri, cs_ref),
                ssm_y=_max_err(y_tri, y_ref) / max(y_ref.float().abs().max().item(), 1e-6),
                ssm_state=_max_err(ss_tri, ss_ref) / max(ss_ref.abs().max().item(), 1e-6))
    ok = (errs["conv_state"] == 0 and errs["conv_out"] <= 1e-2 and errs["ssm_y"] <= 1e-2
          and errs["ssm_state"] <= 1e-5)

    # Bytes moved by one step: the touched state rows twice (read + write), inputs and outputs once.
    conv_bytes = (2 * batch * CONV_DIM * (K - 1) * t["conv_state"].element_size()
                  + _nbytes(t["conv_x"], t["conv_w"], t["conv_b"], out_ref))
    ssm_bytes = (2 * batch * H * P * N * t["ssm_state"].element_size()
                 + _nbytes(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], y_ref))

    times = {}
    for name, fn in (("triton", kernels.conv_update_triton), ("torch", kernels.conv_update_torch)):
        def step(fn=fn):
            fn(t["conv_x"], t["conv_state"], t["conv_w"], t["conv_b"], slots)
        times[("conv", name)] = _graph_ms(step)
        times[("conv", name + " eager")] = _time_ms(step)
    for name, fn in (("triton", kernels.ssm_update_triton), ("torch", kernels.ssm_update_torch)):
        def step(fn=fn):
            fn(*ssm_args, t["ssm_state"], slots)
        times[("ssm", name)] = _graph_ms(step)
        times[("ssm", name + " eager")] = _time_ms(step)
    return dict(errs=errs, ok=ok, bytes={"conv": conv_bytes, "ssm": ssm_bytes}, times=times, t=t)


def sweep(t: dict) -> None:
    """Time other block sizes for the Triton kernels (the defaults live in model/kernels.py)."""
    slots = t["slots"]
    saved = kernels._SSM_BLOCK_P, kernels._CONV_BLOCK_C
    try:
        for bp in (8, 16, 32):
            kernels._SSM_BLOCK_P = bp
            ms = _graph_ms(lambda: kernels.ssm_update_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"],
                                                            t["dt_bias"], t["ssm_state"], slots))
            print(f"  ssm  BLOCK_P={bp:<4d} {ms * 1e3:9.1f} us")
        for bc in (128, 256, 512, 1024):
            kernels._CONV_BLOCK_C = bc
            ms = _graph_ms(lambda: kernels.conv_update_triton(t["conv_x"], t["conv_state"], t["conv_w"],
                                                             t["conv_b"], slots))
            print(f"  conv BLOCK_C={bc:<4d} {ms * 1e3:9.1f} us")
    finally:
        kernels._SSM_BLOCK_P, kernels._CONV_BLOCK_C = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other Triton block sizes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 0
    if not kernels.triton_available():
        print("CUDA is present but Triton is not available (not installed, or CAPTION_DISABLE_TRITON is set)")
        return 1

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {kernels.triton.__version__}")
    print(f"H={H} P={P} N={N} G={G} C={CONV_DIM} K={K} pool S={S}; bf16 activations/conv state, fp32 ssm state")
    print("us = GPU time per call (CUDA graph of 20 calls); eager = one launch timed alone, incl. launch overhead")
    print(f"{'kernel':<6} {'B':>3} {'MB moved':>9} {'triton us':>10} {'GB/s':>7} {'torch us':>10} {'GB/s':>7}"
          f" {'speedup':>8} {'eager tri/torch us':>19}  max err (relative to max |ref|)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    all_ok = True
    last = None
    for batch in BATCHES:
        r = check(batch, gen)
        all_ok &= r["ok"]
        for kind in ("conv", "ssm"):
            nbytes = r["bytes"][kind]
            tri, ref = r["times"][(kind, "triton")], r["times"][(kind, "torch")]
            eager = f"{r['times'][(kind, 'triton eager')] * 1e3:.0f} / {r['times'][(kind, 'torch eager')] * 1e3:.0f}"
            errs = {k: v for k, v in r["errs"].items() if k.startswith(kind)}
            err_txt = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{kind:<6} {batch:>3} {nbytes / 1e6:>9.2f} {tri * 1e3:>10.1f} {nbytes / tri / 1e6:>7.0f}"
                  f" {ref * 1e3:>10.1f} {nbytes / ref / 1e6:>7.0f} {ref / tri:>7.1f}x {eager:>19}  {err_txt}")
        last = r
    if args.sweep and last is not None:
        print(f"block-size sweep at B={BATCHES[-1]} (GPU time per call):")
        sweep(last["t"])
    print("OK: triton matches torch" if all_ok else "MISMATCH between triton and torch paths")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
