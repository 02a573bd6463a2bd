"""The ``dragrt`` command.

Sub-commands: ``info``, ``demo``, ``bench``, ``convert``, ``eval``, ``export``, ``serve``. One whose
feature has not landed yet says so, names the issue that brings it, and exits with status 3; none prints
made-up output.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys

EXIT_NOT_AVAILABLE = 3

# Sub-commands that exist in the interface but whose work has not landed: name -> (issue, what it will do).
_NOT_LANDED = {
    "eval": ("#4 (benchmark harness and quality evaluation) and #7 (model zoo)",
             "score edit quality on the model zoo's world and on DragBench folders"),
    "export": ("the export issue (ONNX / TensorRT / AOTInductor)",
               "export the fixed denoising segments and the StyleGAN2 synthesis"),
    "serve": ("the server issue (HTTP + WebSocket server and web editor)",
              "serve the interactive editor on 127.0.0.1"),
}

_PACKAGES = ("torch", "triton", "diffusers", "transformers", "peft", "safetensors", "numpy", "pillow",
             "xformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_info() -> dict:
    """Everything ``dragrt info`` reports, as plain data (also used by the benchmarks and tests)."""
    import torch

    import dragrt
    from dragrt.kernels import dispatch
    from dragrt.runtime.config import RuntimeConfig, cuda_usable

    devices = [{"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}]
    if cuda_usable():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append({
                "type": "cuda", "index": i, "name": prop.name,
                "capability": f"{prop.major}.{prop.minor}",
                "memory_gib": round(prop.total_memory / 2**30, 1),
                "multiprocessors": prop.multi_processor_count,
            })
    cuda_reason = None
    if not cuda_usable():
        if torch.version.cuda is None:
            cuda_reason = "this torch build has no CUDA support (a CPU build)"
        else:
            cuda_reason = f"torch is built with CUDA {torch.version.cuda} but no CUDA device is usable"
    device_types = ("cpu", "cuda")
    config = RuntimeConfig()
    return {
        "dragrt": dragrt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "cuda_unavailable_reason": cuda_reason,
        "triton_interpret": dispatch.triton_interpret(),
        "kernels_choice": {op: "{} (from {})".format(*dispatch.current_choice(op)) for op in dispatch.ops()},
        "kernels": dispatch.describe(device_types),
        "default_config": {
            "device": str(config.torch_device()),
            "dtype": str(config.torch_dtype()).removeprefix("torch."),
            "kernels": config.kernels,
            "compile_mode": config.compile_mode,
            "cache_dir": str(config.cache_dir),
        },
    }


def _print_info(info: dict) -> None:
    print(f"dragrt {info['dragrt']}  (python {info['python']}, {info['platform']})")
    print("\npackages:")
    for name, ver in info["packages"].items():
        print(f"  {name:<16} {ver or 'not installed'}")
    print("\ndevices:")
    for d in info["devices"]:
        if d["type"] == "cpu":
            print(f"  cpu: {d['name']} ({d['threads']} threads)")
        else:
            print(f"  cuda:{d['index']}: {d['name']}, compute capability {d['capability']}, "
                  f"{d['memory_gib']} GiB, {d['multiprocessors']} SMs")
    if info["cuda_unavailable_reason"]:
        print(f"  no GPU: {info['cuda_unavailable_reason']}")
    interp = " (TRITON_INTERPRET=1: Triton runs on the CPU through its interpreter, for tests)" \
        if info["triton_interpret"] else ""
    print(f"\nkernel implementations{interp}:")
    for op, impls in info["kernels"].items():
        print(f"  {op}  [choice: {info['kernels_choice'][op]}]")
        for impl, per_dev in impls.items():
            for dev, status in per_dev.items():
                mark = "yes" if status == "usable" else "no "
                print(f"    {impl:<10} {dev:<5} {mark} {'' if status == 'usable' else status}")
    cfg = info["default_config"]
    print("\ndefault runtime config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_info(info)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dragrt.runtime import demo

    return demo.main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from dragrt.bench import cli as bench_cli

    return bench_cli.main(args.bench_args)


_CONVERTERS = {"stylegan2": "dragrt.runtime.models.stylegan2_convert"}


def _cmd_convert(args: argparse.Namespace) -> int:
    if not args.kind or args.kind not in _CONVERTERS:
        print(f"dragrt convert: choose what to convert: {', '.join(_CONVERTERS)} "
              "(e.g. dragrt convert stylegan2 IN.pkl OUT)", file=sys.stderr)
        return 2
    return importlib.import_module(_CONVERTERS[args.kind]).main(args.rest)


def _not_landed(name: str, issue: str, what: str) -> int:
    print(f"dragrt {name}: not available yet. It will {what}; it lands with issue {issue}.", file=sys.stderr)
    return EXIT_NOT_AVAILABLE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dragrt", description="Fast interactive generative image editing (drag, sliders, blended).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_dragrt_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices, and which kernel implementations can run here (and why not)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="run the main job on the embedded default model and write images")
    from dragrt.runtime import demo

    demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run benchmark scenarios on a GPU (see bench/README.md)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("convert", help="convert checkpoints to safetensors without running their code "
                                       "(stylegan2: NVIDIA .pkl, rosinality .pt)", add_help=False)
    p.add_argument("kind", nargs="?", help="what to convert: " + ", ".join(_CONVERTERS))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_convert)

    for name, (issue, what) in _NOT_LANDED.items():
        p = sub.add_parser(name, help=f"(not available yet: {issue})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda _a, n=name, i=issue, w=what: _not_landed(n, i, w))
    return parser


def _dragrt_version() -> str:
    import dragrt

    return dragrt.__version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # bad user input: one clear line, no traceback
        print(f"dragrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
