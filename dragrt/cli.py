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
    from dragrt.zoo import registry as zoo_registry

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
        "zoo": zoo_registry.describe(),
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
    print("\nzoo models (zoo:<name>, wherever a model path is accepted):")
    width = max((len(name) for name in info["zoo"]), default=0)
    for name, z in info["zoo"].items():
        if not z["installed"]:
            print(f"  {name:<{width}} not installed; train it with: {z['train']}")
            continue
        notes = [f"{z['bytes'] / 1e6:.1f} MB"]
        if z["stored_in"]:
            notes.append(f"the files of {z['stored_in']}/ (stored once)")
        if z["below_target"]:
            notes.append("provisional: below its target (see its MODEL_CARD.md)")
        print(f"  {name:<{width}} {'; '.join(notes)}")
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
    if args.kind in ("-h", "--help"):
        print(f"usage: dragrt convert {{{','.join(_CONVERTERS)}}} ARGS ... (dragrt convert KIND -h for KIND's "
              "arguments)\nconvert checkpoints to safetensors without running their code")
        return 0
    if not args.kind or args.kind not in _CONVERTERS:
        print(f"dragrt convert: choose what to convert: {', '.join(_CONVERTERS)} "
              "(e.g. dragrt convert stylegan2 IN.pkl OUT)", file=sys.stderr)
        return 2
    return importlib.import_module(_CONVERTERS[args.kind]).main(args.rest)


# --- dragrt eval -----------------------------------------------------------------------------------------

_EVAL_METHODS = ("dragdiffusion", "draggan", "oracle", "identity", "dragbench")
_EVAL_MODES = ("fast", "reference")
# The zoo model each drag method runs on by default (when shipped), what it is, and what --model takes instead.
_DEFAULT_MODELS = {
    "dragdiffusion": ("zoo:faces-sd", "the zoo's diffusion model", "a diffusers folder or a single SD1.x .safetensors"),
    "draggan": ("zoo:faces-stylegan2", "the zoo's StyleGAN2",
                "a converted generator (OUT, OUT.json or OUT.safetensors from 'dragrt convert stylegan2', "
                "or a folder holding generator.json)"),
}
_EVAL_EPILOG = (
    "The suite: drag tasks on held-out faces of the zoo's world (mouth corner, open mouth, raise eyebrow, move eye, "
    "turn head; one and several handles; with and without masks), targets from the renderer's ground truth, scored "
    "by the zoo's landmark regressor (drag error), PSNR/SSIM and an attribute-model feature distance outside the "
    "edited region. Both modes run on the same tasks; one JSON record per run (bench/quality.py explains every "
    "number). dragdiffusion runs on zoo:faces-sd and draggan on zoo:faces-stylegan2 by default (128 px, where "
    "DragGAN's radii are kept at those of 256 px, 2 and 6 px, and its features come from b64, half the image). "
    "oracle and identity are calibration editors (a perfect edit; no edit). dragbench runs DragDiffusion over a local "
    "DragBench folder (--dragbench DIR, --model an SD1.x) and scores mean distance (DIFT features of --model) and "
    "PSNR/SSIM at 224x224 (bench/dragbench.py).")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=_EVAL_METHODS, help="what to score: " + ", ".join(_EVAL_METHODS))
    p.add_argument("--model", default=None, metavar="PATH_OR_ZOO",
                   help="dragdiffusion: a diffusers folder or SD1.x .safetensors (default zoo:faces-sd); draggan: "
                        "a converted StyleGAN2 (default zoo:faces-stylegan2)")
    p.add_argument("--modes", default="fast,reference", metavar="OURS,REFERENCE",
                   help="the two modes compared, ours first (default fast,reference)")
    p.add_argument("--tasks", type=int, default=20, metavar="N",
                   help="number of tasks, interleaved over the five kinds (default 20)")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="at most K drag steps per edit (default: the engine's, 80 for DragDiffusion, 500 for DragGAN)")
    p.add_argument("--inference-steps", type=int, default=None, metavar="N",
                   help="dragdiffusion: DDIM schedule length (default 50)")
    p.add_argument("--lora", action="store_true", help="dragdiffusion: train a per-image LoRA first")
    p.add_argument("--projection-steps", type=int, default=300, metavar="N",
                   help="draggan: projection steps per image (default 300; the edit starts from the projection)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (float16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--size", type=int, default=256, help="task image size, a multiple of 64 (default 256)")
    p.add_argument("--seed", type=int, default=0, help="suite seed (default 0)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="untimed edits before timing each mode (default 1 for dragdiffusion/draggan, 0 otherwise)")
    p.add_argument("--landmarks", default="zoo:faces-landmarks", metavar="PATH_OR_ZOO", help="landmark regressor")
    p.add_argument("--attributes", default="zoo:faces-attributes", metavar="PATH_OR_ZOO", help="attribute model")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the identity and oracle rows (scored on the same tasks, cheap)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the modes are not equal within noise")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: bench/results or $DRAGRT_BENCH_RESULTS)")
    p.add_argument("--dragbench", default=None, metavar="DIR",
                   help="dragbench: the DragBench folder (<category>/<sample>/original_image.png + meta_data.pkl)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N", help="dragbench: only the first N samples")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="dragbench: write DIR/<mode>/<category>/<sample>/dragged_image.png (default: not kept)")


def _eval_modes(text: str) -> tuple[str, str]:
    modes = [m.strip() for m in str(text).split(",")]
    if len(modes) != 2 or any(m not in _EVAL_MODES for m in modes):
        raise ValueError(f"--modes={text!r} is not allowed; give two modes OURS,REFERENCE from: "
                         f"{', '.join(_EVAL_MODES)} (e.g. fast,reference)")
    return modes[0], modes[1]


def _eval_positive(name: str, value: int | None, hi: int) -> None:
    if value is not None and not 1 <= value <= hi:
        raise ValueError(f"{name}={value} is not allowed; use an integer from 1 to {hi}")


def _eval_editor_factory(args: argparse.Namespace, runtime, landmark_model):
    """``mode -> editor`` for the method; loads its model once (FileNotFoundError / ValueError when it cannot)."""
    from dragrt.bench import quality
    from dragrt.zoo.registry import resolve

    if args.method in quality.CALIBRATION_EDITORS:
        editor = quality.CALIBRATION_EDITORS[args.method]
        return lambda mode: editor
    zoo_name, what, expected = _DEFAULT_MODELS[args.method]
    if args.model is None:
        args.model = zoo_name
    try:
        resolve(args.model)
    except FileNotFoundError as exc:
        if args.model.strip().rstrip("/") == zoo_name:
            what = what[0].upper() + what[1:]
            raise FileNotFoundError(f"{exc}. {what} is not in this installation; "
                                    f"pass --model with {expected}") from None
        raise
    device = runtime.torch_device()
    config = {} if args.steps is None else {"max_steps": args.steps}
    if args.method == "dragdiffusion":
        from dragrt.runtime.models.sd import load_sd

        components = load_sd(args.model, torch_dtype=runtime.torch_dtype(), device=device)
        if args.inference_steps is not None:
            config["num_inference_steps"] = args.inference_steps
        if args.lora:
            config["lora"] = True
        return lambda mode: quality.dragdiffusion_editor(components, mode, runtime=runtime, **config)
    from dragrt.runtime.models.stylegan2_convert import load_generator

    generator = load_generator(args.model, device=device)
    shared: dict = {}  # one projection per task, for both modes
    return lambda mode: quality.draggan_editor(generator, mode, landmark_model=landmark_model, runtime=runtime,
                                               projection_steps=args.projection_steps, inversion_cache=shared,
                                               **config)


def _cmd_eval_dragbench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dragrt.bench import dragbench, harness
    from dragrt.runtime.config import RuntimeConfig

    ours_mode, ref_mode = _eval_modes(args.modes)
    _eval_positive("--max-samples", args.max_samples, 100_000)
    _eval_positive("--steps", args.steps, 100_000)
    _eval_positive("--inference-steps", args.inference_steps, 1000)
    if args.dragbench is None:
        raise ValueError("dragbench needs --dragbench DIR: a DragBench folder (<category>/<sample>/original_image.png "
                         "and meta_data.pkl)")
    if args.model is None:
        raise ValueError("dragbench needs --model: a diffusers folder or a single SD1.x .safetensors")
    samples = dragbench.read_dragbench(args.dragbench)[: args.max_samples]  # errors before the model loads
    warmup = 1 if args.warmup is None else args.warmup
    if not 0 <= warmup <= len(samples):
        raise ValueError(f"--warmup={warmup} is not allowed; use 0 to the number of samples ({len(samples)})")
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype)
    device = runtime.torch_device()
    from dragrt.runtime.models.sd import load_sd

    try:
        components = load_sd(args.model, torch_dtype=runtime.torch_dtype(), device=device)
    except FileNotFoundError as exc:
        print(f"dragrt eval: error: {exc}", file=sys.stderr)
        return 2
    config = {} if args.steps is None else {"max_steps": args.steps}
    if args.inference_steps is not None:
        config["num_inference_steps"] = args.inference_steps
    if args.lora:
        config["lora"] = True
    cache: dict = {}  # the source images' DIFT features, shared by both modes
    runs = {}
    for role, mode in (("ours", ours_mode), ("reference", ref_mode)):
        images = Path(args.images) / mode if args.images else None
        runs[role] = dragbench.run_dragbench(samples, components, mode=mode, out_dir=images, runtime=runtime,
                                             warmup=warmup, feature_cache=cache, **config)
    timing = {role: harness.Timing(times_ms=[r["wall_s"] * 1e3 for r in run["rows"]], clock=harness.CLOCK_CPU,
                                   warmup_reps=len(run["warmup_s"])) for role, run in runs.items()}
    record_config = {
        "method": "dragdiffusion", "benchmark": "dragbench", "dragbench": str(args.dragbench), "model": args.model,
        "modes": {"ours": ours_mode, "reference": ref_mode}, "samples": len(samples),
        "max_steps": args.steps, "num_inference_steps": args.inference_steps, "lora": bool(args.lora),
        "warmup_edits": warmup, "device": str(device), "dtype": str(runtime.torch_dtype()).removeprefix("torch."),
        "extractor": runs["ours"]["extractor"],
    }
    compile_s = {role: sum(run["warmup_s"]) for role, run in runs.items()} if warmup else None
    record = harness.make_record("quality-dragbench", record_config, timing["ours"], timing["reference"],
                                 compile_s=compile_s,
                                 extra={"timing_note": "ours/reference: wall time per edit (host clock)"})
    record["quality"] = {role: {k: v for k, v in run.items() if k != "config"} for role, run in runs.items()}
    record["quality"]["fidelity_note"] = dragbench.LPIPS_NOTE
    path = harness.write_record(record, args.out)
    print(f"{'mode':<22}{'MD px':>9}{'PSNR224':>9}{'SSIM224':>9}{'s/edit':>9}")
    for role, mode in (("ours", ours_mode), ("reference", ref_mode)):
        m = runs[role]["means"]
        cells = [f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in (m["md_px"], m["psnr_224"], m["ssim_224"],
                                                                           m["wall_s"])]
        print(f"{role + ': ' + mode:<22}" + "".join(cells))
    print(f"({len(samples)} samples, {runs['ours']['n_pairs']} point pairs; MD by DIFT features of --model; "
          f"LPIPS not available: PSNR/SSIM at 224x224 instead)")
    print(f"wrote {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    from dragrt.bench import harness, quality
    from dragrt.runtime import drag
    from dragrt.runtime.config import RuntimeConfig
    from dragrt.zoo import evaluators

    if args.method == "dragbench":
        return _cmd_eval_dragbench(args)
    ours_mode, ref_mode = _eval_modes(args.modes)
    _eval_positive("--tasks", args.tasks, 5000)
    _eval_positive("--steps", args.steps, 100_000)
    _eval_positive("--inference-steps", args.inference_steps, 1000)
    _eval_positive("--projection-steps", args.projection_steps, 100_000)
    engines = args.method not in quality.CALIBRATION_EDITORS
    warmup = (1 if engines else 0) if args.warmup is None else args.warmup
    if not 0 <= warmup <= args.tasks:
        raise ValueError(f"--warmup={warmup} is not allowed; use 0 to --tasks ({args.tasks})")
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype)
    device = runtime.torch_device()
    try:
        landmarks = evaluators.load_landmark_model(args.landmarks, device)
        attributes = evaluators.load_attribute_model(args.attributes, device)
        make_editor = _eval_editor_factory(args, runtime, landmarks)
    except FileNotFoundError as exc:
        print(f"dragrt eval: error: {exc}", file=sys.stderr)
        return 2
    n_per_kind = math.ceil(args.tasks / len(quality.KINDS))
    tasks = quality.drag_suite(n_per_kind, seed=args.seed, size=args.size)[: args.tasks]

    def progress(role: str, mode: str):
        def show(i: int, task, row: dict) -> None:
            print(f"[{role}: {mode}] {i + 1}/{len(tasks)} {task.name}: drag error {row['drag_error_px']:.2f} px "
                  f"(start {row['handle_start_error_px']:.2f}), {row['edit_ms']:.0f} ms", file=sys.stderr)
        return show

    runs = {}
    for role, mode in (("ours", ours_mode), ("reference", ref_mode)):
        editor = make_editor(mode)
        runs[role] = quality.run_suite(editor, tasks, landmarks, attributes, warmup=warmup,
                                       progress=progress(role, mode))
        if hasattr(editor, "close"):
            editor.close()
    calibration = None
    if engines and not args.no_calibration:
        calibration = {name: quality.run_suite(ed, tasks, landmarks, attributes)
                       for name, ed in quality.CALIBRATION_EDITORS.items()}
    q = quality.quality_object(runs["ours"], runs["reference"], calibration=calibration)
    config = {
        "method": args.method, "model": args.model, "modes": {"ours": ours_mode, "reference": ref_mode},
        "tasks": len(tasks), "suite_seed": args.seed, "size": args.size, "kinds": list(quality.KINDS),
        "max_steps": args.steps, "warmup_edits": warmup, "device": str(device),
        "dtype": str(runtime.torch_dtype()).removeprefix("torch."),
        "landmark_model": args.landmarks, "attribute_model": args.attributes,
    }
    if args.method == "dragdiffusion":
        config.update(num_inference_steps=args.inference_steps, lora=bool(args.lora))
    if args.method == "draggan":
        config["projection_steps"] = args.projection_steps
        config["generator_resolution"] = editor.resolution
        config["radii_px"] = list(drag.draggan_pixel_radii(editor.resolution, editor.config.r1, editor.config.r2))
    compile_s = ({"ours": sum(runs["ours"].warmup_s), "reference": sum(runs["reference"].warmup_s)}
                 if warmup else None)
    record = harness.make_record(f"quality-{args.method}", config, runs["ours"].timing(),
                                 runs["reference"].timing(), compile_s=compile_s,
                                 extra={"timing_note": "ours/reference: wall time per edit (host clock)"})
    record["quality"] = q
    path = harness.write_record(record, args.out)
    print(quality.format_table(q, {"ours": f"{args.method} {ours_mode}", "reference": f"{args.method} {ref_mode}"}),
          end="")
    print(f"wrote {path}")
    if not q["equal_within_noise"]:
        print(f"dragrt eval: {ours_mode} and {ref_mode} differ beyond noise in drag error "
              f"({q['comparison']['drag_error_mean_diff_px']:+.3f} px)", file=sys.stderr)
        if args.strict:
            return 1
    return 0


def _not_landed(name: str, issue: str, what: str) -> int:
    print(f"dragrt {name}: not available yet. It will {what}; it lands with {issue}.", file=sys.stderr)
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

    p = sub.add_parser("eval", help="score drag quality on the model zoo's world, fast vs reference mode",
                       description="Score drag quality on the model zoo's world, fast vs reference mode.",
                       epilog=_EVAL_EPILOG)
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    # "bench" and "convert" hand everything after them to their own CLIs, "-h" included (an argparse REMAINDER
    # argument does not take a leading option, so parse_args would reject "dragrt bench -h").
    if argv and argv[0] == "bench":
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    if argv and argv[0] == "convert":
        return _cmd_convert(argparse.Namespace(kind=argv[1] if len(argv) > 1 else None, rest=argv[2:]))
    if argv and argv[0] in _NOT_LANDED:  # whatever follows ("-h" too), the answer is that it has not landed
        return _not_landed(argv[0], *_NOT_LANDED[argv[0]])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:  # bad input or a missing model/file: one clear line
        print(f"dragrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
