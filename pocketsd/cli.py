"""The ``pocketsd`` command. Only this module prints; everything it calls logs or returns."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from pocketsd.contract import COMPUTE_UNITS, MAX_IMAGES
from pocketsd.errors import GenerateError, OutputError, PresetError, UserError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line like every other error (argparse would print its usage block, then the error)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message, f"see `{self.prog} --help`", code="usage")


def _chunks_arg(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected COMPONENT=N (e.g. unet=4), got {text!r}")
    return name, int(count)


def cmd_random_model(args: argparse.Namespace) -> int:
    from pocketsd.export.original_layout import check_single_file_target, layout_problem, write_original_layout
    from pocketsd.export.random_model import builtin_configs, write_random_model

    configs = builtin_configs(args.arch)
    if args.single_file is not None:  # refused before the model is built, not after
        check_single_file_target(args.single_file)
        problem = layout_problem(configs.unet, configs.text_encoder,
                                 configs.extra.get("pipeline_class", "StableDiffusionPipeline"))
        if problem:
            raise UserError(f"--single-file: --arch {args.arch} has no original layout pocketsd writes: {problem}",
                            "use --arch tiny, tiny-inpaint, sd15, sd15-inpaint, tiny-sd21, sd21, tiny-sdxl or sdxl",
                            code="arch")
    out = write_random_model(args.dir, configs)
    print(f"wrote random {args.arch} model to {out}")
    if args.single_file is not None:
        print(f"wrote it as one original-layout checkpoint to {write_original_layout(out, args.single_file)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from pocketsd.export.exporter import ExportRequest, export_bundle
        from pocketsd.export.lora import parse_lora_arg
        from pocketsd.export.preset import load_preset, with_overrides
    except ImportError as exc:
        raise UserError(f"exporting needs the [export] extra ({exc.name} is not installed)",
                        "pip install 'pocketsd[export]' (see README)", code="missing-extra") from None
    if args.seed < 0:
        raise PresetError(f"command line: --seed is {args.seed}", "give a seed ≥ 0")
    chunks = dict(args.chunks or [])
    if len(chunks) != len(args.chunks or []):
        raise PresetError("command line: --chunks names a component twice", "give each component once")
    preset = with_overrides(load_preset(args.preset), chunks, args.max_chunk_mb, args.resolution)
    out = export_bundle(ExportRequest(model=args.model, preset=preset, out=Path(args.out), seed=args.seed,
                                      progress=not args.quiet, warm_cache=not args.no_warm_cache,
                                      variant=args.variant, loras=tuple(parse_lora_arg(a) for a in args.lora or ()),
                                      tokenizer=args.tokenizer, prediction_type=args.prediction_type))
    print(f"wrote bundle {out} (preset {preset.name}); see `pocketsd inspect {out}`")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pocketsd.runtime.describe import describe, format_table
    from pocketsd.runtime.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    _check_for_inspect(manifest, Path(args.bundle))
    info = describe(manifest, Path(args.bundle))
    print(json.dumps(info, indent=2) if args.json else format_table(info), end="" if not args.json else "\n")
    return 0


def _check_for_inspect(manifest: Any, bundle: Path) -> None:
    """What the table reads beyond a valid manifest (which may lack what only generating needs): dims, the preset's
    config, and the plan file, hash-checked since it is parsed here and nowhere else."""
    from pocketsd.errors import BundleError
    from pocketsd.runtime.hashing import sha256_path
    from pocketsd.runtime.json_fields import Field

    where = str(bundle / "manifest.json")
    for name in ("height", "width", "latent_height", "latent_width", "unet_batch", "text_length"):
        if name not in manifest.dims:
            raise Field(None, where, f"dims.{name}").fail("is missing")
    config = Field(manifest.target, where, "target").key("config", {})
    config.key("runtime", {}).key("memory", "resident").str()
    config.key("attention", {}).obj()
    plan = manifest.plan
    if plan is not None and sha256_path(bundle / plan.path) != plan.sha256:
        raise BundleError(f"{bundle / plan.path} does not match its sha256 in the manifest",
                          "re-export or re-copy the bundle")


def _memory(args: argparse.Namespace) -> str | None:
    """--memory, or --low-memory (= --memory stream); None: the bundle's preset decides."""
    from pocketsd.runtime.execution import check_memory

    if args.low_memory and args.memory not in (None, "stream"):
        raise UserError(f"--low-memory means --memory stream, but --memory {args.memory} was also given",
                        "give only one of them", code="generate")
    memory = "stream" if args.low_memory else args.memory
    return None if memory is None else check_memory(memory)


def cmd_generate(args: argparse.Namespace) -> int:
    import secrets

    from tqdm import tqdm

    from pocketsd.runtime.images import image_to_array, load_image, save_png
    from pocketsd.runtime.inpaint import mask_to_array
    from pocketsd.runtime.pipeline import Pipeline
    from pocketsd.runtime.schedulers import available

    _check_generate_args(args)
    if args.scheduler is not None and args.scheduler not in available():
        raise UserError(f"unknown scheduler {args.scheduler!r}", f"known: {', '.join(available())}", code="generate")
    if args.init_image is None and args.strength is not None:
        raise UserError("--strength needs --init-image", "add --init-image PNG, or drop --strength", code="generate")
    if args.init_image is None and args.mask is not None:
        raise UserError("--mask needs --init-image (the image it masks)", "add --init-image PNG", code="generate")
    pipe = Pipeline.from_bundle(args.bundle, threads=args.threads, compute_units=args.compute_units,
                                memory=_memory(args), engine=args.engine)
    init = load_image(args.init_image) if args.init_image else None
    mask = load_image(args.mask, "--mask") if args.mask else None
    if init is not None:  # fail on a wrong size now, not after the prompt is encoded
        image_to_array(init, pipe.manifest.dims["height"], pipe.manifest.dims["width"])
    if mask is not None:
        mask_to_array(mask, pipe.manifest.dims["height"], pipe.manifest.dims["width"])
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    params = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "steps": args.steps,
              "guidance": args.guidance, "scheduler": args.scheduler or pipe.default_scheduler, "seed": seed,
              "bundle": pipe.manifest.model.get("name"), "preset": pipe.manifest.target.get("preset")}
    if init is not None:
        default_strength = 0.8 if mask is None else 1.0
        params.update(init_image=Path(args.init_image).name,
                      strength=default_strength if args.strength is None else args.strength)
    if mask is not None:
        params.update(mask=Path(args.mask).name)
    with tqdm(total=args.steps, desc="generate", unit="step", disable=args.quiet) as bar:
        def on_step(done: int, total: int, _latents: object) -> None:
            bar.total = total
            bar.update(done - bar.n)

        images = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, scheduler=params["scheduler"], seed=seed, image=init,
                      strength=params.get("strength"), mask_image=mask, callback=on_step,
                      num_images_per_prompt=args.num_images)
    if args.num_images == 1:
        save_png(images, args.out, params)
        print(f"wrote {args.out} (seed {seed})")
        return 0
    paths = image_paths(Path(args.out), args.num_images)
    for index, (image, path) in enumerate(zip(images, paths), start=1):
        save_png(image, path, {**params, "num_images": args.num_images, "image_index": index})
    print(f"wrote {len(paths)} images, {paths[0]} … {paths[-1]} (seed {seed})")
    return 0


def image_paths(out: Path, n: int) -> list[Path]:
    """``--out x.png`` with ``--num-images n`` > 1: x-1.png … x-n.png (zero-padded to the same width)."""
    width = len(str(n))
    return [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix or '.png'}") for i in range(1, n + 1)]


def _check_generate_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and an unwritable --out before the bundle is loaded (the pipeline checks them again)."""
    if args.steps < 1:
        raise GenerateError(f"--steps is {args.steps}", "give at least 1 step (20 is usual)")
    if not math.isfinite(args.guidance):
        raise GenerateError(f"--guidance is {args.guidance}", "give a finite number: 7.5 is usual, ≤ 1 turns it off")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise GenerateError(f"--strength is {args.strength}", "give a number in (0, 1]: 0.8 is usual")
    if args.seed is not None and args.seed < 0:
        raise GenerateError(f"--seed is {args.seed}", "give a seed ≥ 0, or none for a random one")
    if args.threads is not None and args.threads < 0:
        raise GenerateError(f"--threads is {args.threads}", "give a number of threads ≥ 0 (0: all cores)")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise GenerateError(f"--num-images is {args.num_images}", f"give a number of images from 1 to {MAX_IMAGES}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: " + ("it is a folder" if out.is_dir() else f"{out.parent} is not a "
                          "folder"), "give --out a PNG path in an existing folder")


def cmd_apple_resources(args: argparse.Namespace) -> int:
    from pocketsd.apple.resources import write_resources

    report = write_resources(args.bundle, args.out, compile_models=not args.no_compile)
    print(f"wrote Apple Resources layout to {args.out}")
    for name, state in report["files"].items():
        print(f"  {name}: {state}")
    return 0


def _size_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size in pixels such as 512, got {text!r}")
    return int(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from pocketsd.bench.bench_output import write_results
    from pocketsd.bench.contenders import by_names, optimum_python
    from pocketsd.bench.side_by_side import BenchRequest, run_bench, ticks_expected
    from pocketsd.export.random_model import BUILTIN_MODELS

    if args.model not in BUILTIN_MODELS and not Path(args.model, "model_index.json").is_file():
        raise UserError(f"--model {args.model}: not a diffusers model folder (no model_index.json)",
                        "give a diffusers folder (see `pocketsd random-model`), 'tiny' or 'shapes'", code="bench")
    if args.calls < 1 or args.steps < 0 or args.warmup < 0:
        raise UserError("--calls must be ≥ 1 and --steps, --warmup ≥ 0", "see pocketsd bench --help", code="bench")
    request = BenchRequest(model=args.model, contenders=tuple(by_names(args.contender)), work=Path(args.work),
                           resolutions=tuple(args.resolution or (256, 512)), preset=args.preset, calls=args.calls,
                           warmup=args.warmup, steps=args.steps, threads=args.threads,
                           reuse_bundles=args.reuse_bundles, optimum_python=optimum_python(args.optimum_python),
                           batch_one=not args.no_batch_one, load_orders=args.load_orders)
    with tqdm(total=ticks_expected(request), desc="bench", unit="step", disable=args.quiet) as bar:
        def tick(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        result = run_bench(request, tick)
    write_results(result, Path(args.out), "pocketsd " + " ".join(sys.argv[1:]))
    print((Path(args.out) / "result.md").read_text())
    failed = [r["contender"] for s in result["resolutions"] for r in s["rows"] if r.get("error")]
    print(f"wrote {args.out}/result.json, result.md and chart.png" + (f"; failed: {', '.join(failed)}" if failed
                                                                       else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pocketsd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("random-model", help="write a diffusers SD folder with random weights")
    p.add_argument("dir")
    from pocketsd.export.random_model import ARCHS

    p.add_argument("--arch", choices=ARCHS, default="tiny",
                   help="tiny, sd15 (SD 1.5), tiny-sd21, sd21 (SD 2.1 768-v), tiny-inpaint, sd15-inpaint "
                        "(9-channel inpainting UNet), tiny-turbo (SD-Turbo style); the ones not named tiny are at "
                        "full published size")
    p.add_argument("--single-file", metavar="FILE.safetensors",
                   help="also write the model as one checkpoint in its original (CompVis / SGM) key layout, as "
                        "single-file models are shared (SD 1.x, 2.x and SDXL archs)")
    p.set_defaults(run=cmd_random_model)

    p = sub.add_parser("export", help="export a model to a chunked, parity-checked bundle")
    p.add_argument("--model", required=True,
                   help="'tiny' (built-in, random weights), 'shapes' (built-in, trained: draws its prompt), a "
                        "diffusers model folder, or a single-file SD 1.x, 2.x or SDXL checkpoint "
                        "(.safetensors in the original layout; needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="for a single-file --model: the tokenizer/ folder (vocab.json, merges.txt) of a diffusers "
                        "model of the same family, e.g. SD 1.5's (SDXL's second tokenizer is the same with '!' as "
                        "its pad token)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="for a single-file --model: what its UNet predicts; needed for SD 2.x files, whose weights do "
                        "not say (v_prediction: 768² 'v' models such as SD 2.1; epsilon: 512² base models)")
    p.add_argument("--preset", default="cpu", help="built-in preset name (cpu, cpu-lowmem, ...) or a YAML file")
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="fuse this LoRA (.safetensors, diffusers or kohya layout) into the weights at SCALE (default "
                        "1.0), as diffusers' fuse_lora; repeatable, fused in order")
    p.add_argument("--variant", help="load this weights variant (e.g. fp16: model.fp16.safetensors), in float32; "
                                     "default: the full-precision weights, else the one variant a sub-model has")
    p.add_argument("--chunks", type=_chunks_arg, action="append", metavar="COMPONENT=N",
                   help="cut COMPONENT into N chunks (overrides the preset; repeatable)")
    p.add_argument("--max-chunk-mb", type=float, help="cut every component so no chunk holds more weights than this")
    p.add_argument("--resolution", help="image size HEIGHTxWIDTH (default: the preset's, else the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parity-check inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-warm-cache", action="store_true",
                   help="do not open the bundle's ONNX chunks once after export to fill onnxruntime's graph cache; "
                        "the first generate then takes longer")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("generate", help="make an image from a bundle (numpy + onnxruntime only)")
    p.add_argument("bundle")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (≤ 1: off)")
    p.add_argument("--scheduler", help="ddim, euler, euler_a, heun, lms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, "
                                       "dpmpp_2m_sde_karras, unipc, lcm, pndm (default: the model's own)")
    p.add_argument("--seed", type=int, help="same seed, same bundle, same options → the same PNG, byte for byte")
    p.add_argument("--init-image", help="img2img: start from this image (must be the bundle's size)")
    p.add_argument("--strength", type=float, help="img2img: how much to change the init image, 0..1 (default 0.8; "
                                                  "1.0 with --mask)")
    p.add_argument("--mask", help="inpainting: a PNG of the init image's size, white where to repaint (needs "
                                  "--init-image; an inpainting bundle requires it)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: the preset's; 0 = all cores)")
    p.add_argument("--engine", default="onnxruntime", metavar="{onnxruntime,openvino,openvino-bf16}",
                   help="what runs the ONNX chunks (openvino: pip install 'pocketsd[openvino]'; openvino-bf16: "
                        "OpenVINO computing in bfloat16 on CPUs with bf16 units, ~2x faster, not bit-faithful)")
    p.add_argument("--compute-units", choices=tuple(COMPUTE_UNITS),
                   help="CoreML bundles on macOS: where to run")
    p.add_argument("--memory", metavar="{resident,stream,prefetch}",
                   help="when chunks are loaded: resident (all kept), stream (one at a time: least memory), prefetch "
                        "(stream, loading the next chunk while one runs); default: the bundle's preset, else resident")
    p.add_argument("--low-memory", action="store_true", help="the same as --memory stream")
    p.add_argument("--out", required=True, help="PNG to write (with --num-images N > 1: OUT-1.png … OUT-N.png)")
    p.add_argument("--num-images", type=int, default=1, help="images from the one prompt, denoised as one batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("apple-resources", help="lay a CoreML bundle out as the Resources folder of Apple's Swift "
                                               "StableDiffusionPipeline")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="Resources folder to create")
    p.add_argument("--no-compile", action="store_true", help="leave .mlpackage files (no .mlmodelc even on macOS)")
    p.set_defaults(run=cmd_apple_resources)

    p = sub.add_parser("bench", help="time pocketsd against its peers (diffusers, onnxruntime, OpenVINO, optimum) "
                                     "on one model: JSON, markdown table and chart")
    p.add_argument("--model", required=True,
                   help="'tiny' (built-in, random weights), 'shapes' (built-in, trained) or a diffusers model folder")
    p.add_argument("--resolution", type=_size_arg, action="append", help="square size in pixels (repeatable; "
                                                                         "default 256 and 512)")
    p.add_argument("--preset", default="cpu", help="the preset of the chunked bundle (default cpu)")
    p.add_argument("--contender", action="append", help="run only these (repeatable; default: all of them)")
    p.add_argument("--calls", type=int, default=5, help="timed UNet calls per contender (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed UNet calls first")
    p.add_argument("--steps", type=int, default=20, help="end-to-end steps per contender (0: none)")
    p.add_argument("--threads", type=int, default=0, help="threads for every contender (0 = all cores)")
    p.add_argument("--work", default="results/bench/work", help="bundles, optimum's export and logs (GBs at "
                                                                 "full size)")
    p.add_argument("--reuse-bundles", action="store_true", help="use bundles an earlier run left in --work "
                                                                "(their export is then not timed)")
    p.add_argument("--optimum-python", help="the python of optimum's environment (default: $POCKETSD_OPTIMUM_PYTHON, "
                                            "else .venv-optimum/bin/python from `make bench-env-optimum`)")
    p.add_argument("--no-batch-one", action="store_true", help="skip the batch-1 UNet calls (one unguided step) of "
                                                                "pocketsd's chunked bundle at the largest size")
    p.add_argument("--load-orders", type=int, choices=(1, 2), default=2,
                   help="2 (default): every group of workers runs twice, loaded in one order and then the reverse, "
                        "and each ratio is read from both (the worker loaded first can be slower); 1: once, in "
                        "about half the time")
    p.add_argument("--out", default="results/bench", help="folder for result.json, result.md and chart.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("inspect", help="show a bundle's components, chunks, sizes and parity figures")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # on import off macOS it warns that it cannot run models, which we say where it matters
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as exc:
        print(exc.one_line(), file=sys.stderr)
        if exc.details:
            print(exc.details, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the staging folders are gone by now (staging.py): say so, in the one-line form
        print("error[interrupted]: interrupted — nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
