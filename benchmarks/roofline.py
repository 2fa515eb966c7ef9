"""Roofline of the GPU kernels: DRAM bytes each moves per token, and the time that predicts on H100 / H200.

An analytic count, not a measurement (no GPU has run these kernels yet): for every kernel, the
bytes it must read and write per token and layer at the tiles the code picks, beside mamba-ssm's
CUDA scan for the same shape, and the time those bytes take at the nominal HBM bandwidth (H100 SXM
3.35 TB/s, H200 4.8 TB/s) for one layer of a batch. The prediction is a floor: it assumes full
bandwidth and no other limit (latency of the sequential chunk loop, L2 atomics of dB / dC).
`benchmarks/kernel_speed.py` measures the achieved bandwidth on a GPU (scripts/gpu_check.sh).

    python benchmarks/roofline.py                         # mamba-130m: d_inner 1536, N 16, bf16, B8 x L2048
    python benchmarks/roofline.py --d-inner 4096 --tokens 16384

Counted per token and layer (D = d_inner, N = state, e = activation bytes, fp32 = 4):
  scan fwd   reads u, Δ, z (3·D·e), B, C (2·N·e); writes out (D·e) and the chunk-boundary state
             (D·N·4 / CHUNK). mamba-ssm writes out and out_z (2·D·e) and its chunk states (chunk 2048).
  scan bwd   reads u, Δ, z, dout (4·D·e), B, C, the chunk states; writes du, dz (2·D·e), dΔ (fp32 here,
             D·4; e in mamba-ssm) and dB, dC (2·N·4, fp32). mamba-ssm also re-reads out (D·e) for dz.
  gate+neuron fwd: reads y, z (2·D·e), writes out_proj's input (D·e); bwd: reads y, z, dout, writes dy, dz.
  state update (decode, one token): reads and writes the state (2·D·N·s, s = state bytes), reads
             x, Δ, z (3·D·e), B, C; writes out (D·e).
Writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "roofline.json"
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # bytes / s, nominal HBM3 / HBM3e
MAMBA_SSM_CHUNK = 2048  # mamba-ssm's selective_scan_fwd stores a state every kChunkSize = 2048 tokens
try:  # the chunk the Triton scan uses on a GPU (its chunk-boundary states are part of the traffic)
    from spiking.triton_scan import GPU_FWD_TILE

    GPU_CHUNK = GPU_FWD_TILE[1]
except ImportError:  # triton not installed: the value the code had when this was written
    GPU_CHUNK = 32


def bytes_per_token(D: int, N: int, e: int, chunk: int, state_bytes: int) -> dict[str, dict[str, float | None]]:
    """{kernel: {"ours": bytes, "mamba_ssm": bytes or None}} per token and layer."""
    f32 = 4
    ours_fwd = 3 * D * e + 2 * N * e + D * e + D * N * f32 / chunk
    mamba_fwd = 3 * D * e + 2 * N * e + 2 * D * e + D * 2 * N * f32 / MAMBA_SSM_CHUNK
    ours_bwd = 4 * D * e + 2 * N * e + D * N * f32 / chunk + 2 * D * e + D * f32 + 2 * N * f32
    mamba_bwd = 5 * D * e + 2 * N * e + D * 2 * N * f32 / MAMBA_SSM_CHUNK + 3 * D * e + 2 * N * f32
    gate_fwd = 3 * D * e
    gate_bwd = 5 * D * e
    step = 2 * D * N * state_bytes + 3 * D * e + 2 * N * e + D * e
    return {
        "selective scan, forward": {"ours": ours_fwd, "mamba_ssm": mamba_fwd},
        "selective scan, backward": {"ours": ours_bwd, "mamba_ssm": mamba_bwd},
        "fused gate + neuron, forward": {"ours": gate_fwd, "mamba_ssm": None},
        "fused gate + neuron, backward": {"ours": gate_bwd, "mamba_ssm": None},
        "one-token state update (decode)": {"ours": step, "mamba_ssm": step},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-inner", type=int, default=1536, help="mamba-130m: 2 x 768")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--act-bytes", type=int, default=2, help="2 = bf16 activations, 4 = fp32")
    parser.add_argument("--state-bytes", type=int, default=4, help="decode state dtype (the cache keeps the model's)")
    parser.add_argument("--tokens", type=int, default=8 * 2048, help="tokens of one layer's pass (B x L)")
    parser.add_argument("--decode-batch", type=int, default=64, help="sequences per decode step")
    parser.add_argument("--chunk", type=int, default=GPU_CHUNK)
    args = parser.parse_args()
    table = bytes_per_token(args.d_inner, args.state, args.act_bytes, args.chunk, args.state_bytes)
    rows = []
    print(f"D = {args.d_inner}, N = {args.state}, activations {args.act_bytes} B, chunk {args.chunk}; "
          f"time for {args.tokens} tokens of one layer ({args.decode_batch} for the decode step)")
    print(f"{'kernel':34s} {'B/token':>9s} {'mamba-ssm':>10s} " +
          " ".join(f"{name + ' µs':>12s} {'mamba µs':>9s}" for name in BANDWIDTH))
    for kernel, sizes in table.items():
        tokens = args.decode_batch if "decode" in kernel else args.tokens
        row = {"kernel": kernel, "bytes_per_token": sizes["ours"], "mamba_ssm_bytes_per_token": sizes["mamba_ssm"],
               "tokens": tokens, "predicted_us": {}, "mamba_ssm_predicted_us": {}}
        cells = []
        for name, bw in BANDWIDTH.items():
            ours = sizes["ours"] * tokens / bw * 1e6
            theirs = None if sizes["mamba_ssm"] is None else sizes["mamba_ssm"] * tokens / bw * 1e6
            row["predicted_us"][name] = ours
            row["mamba_ssm_predicted_us"][name] = theirs
            cells.append(f"{ours:12.1f} {'-' if theirs is None else f'{theirs:.1f}':>9s}")
        rows.append(row)
        theirs_bytes = "-" if sizes["mamba_ssm"] is None else f"{sizes['mamba_ssm']:.0f}"
        print(f"{kernel:34s} {sizes['ours']:9.0f} {theirs_bytes:>10s} " + " ".join(cells))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "bandwidth_bytes_per_s": BANDWIDTH, "rows": rows}, indent=1))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
