"""The optimum contender's worker for ``pocketsd bench``: optimum's ``ORTDiffusionPipeline`` on optimum's own ONNX
export of the diffusers folder, on onnxruntime's CPUExecutionProvider (the protocol: worker_protocol.py).

    OPTIMUM_PYTHON bench/optimum_worker.py '{"model": "...", "export_dir": "...", "height": 512, "width": 512,
                                             "threads": 0, "unet_batch": 2}'

It runs in optimum's own environment, whose pins clash with ours (optimum-onnx 0.1.0 wants transformers<4.58): the
bench finds that Python as ``--optimum-python``, else $POCKETSD_OPTIMUM_PYTHON, else ``.venv-optimum/bin/python``
(``make bench-env-optimum``). So it imports nothing from pocketsd, only worker_protocol.py beside it, by path.
Everything is offline: the model is a local folder and the hub is never asked.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import worker_protocol  # noqa: E402  (by path: this environment has no pocketsd)

Spec = dict[str, Any]
Request = dict[str, Any]


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("optimum", "optimum-onnx", "onnxruntime", "diffusers", "transformers", "torch", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _noise_prediction(output: Any) -> Any:
    """The UNet's output tensor as numpy, from the output object optimum's UNet returns (a ModelOutput or tuple)."""
    first = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return first.detach().numpy() if hasattr(first, "detach") else first


def handlers(spec: Spec) -> dict[str, worker_protocol.Handler]:
    threads = int(spec.get("threads") or 0)
    export_dir = Path(spec["export_dir"])
    state: dict[str, Any] = {}

    def export(_request: Request) -> dict[str, Any]:
        """optimum's export (what ``optimum-cli export onnx --task text-to-image`` does, validation included),
        written beside export_dir and renamed into place, so a half export never counts."""
        if (export_dir / "model_index.json").is_file():
            return {"seconds": 0.0, "exported": False}
        from optimum.exporters.onnx import main_export

        partial = export_dir.with_name(export_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        main_export(spec["model"], partial, task="text-to-image", local_files_only=True)
        seconds = time.perf_counter() - start
        shutil.rmtree(export_dir, ignore_errors=True)  # an export_dir without model_index.json is a leftover
        partial.rename(export_dir)
        return {"seconds": seconds, "exported": True}

    def load(_request: Request) -> dict[str, Any]:
        """The pipeline with every session open, intra-op threads = spec threads (0: onnxruntime's default, one per
        physical core); the UNet inputs of ``call`` are made afterwards, outside the timing."""
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTDiffusionPipeline

        state.clear()  # drop the previous pipeline and its sessions before loading again (its parts point back at it:
        gc.collect()  # a cycle, freed only by the collector)
        torch.set_num_threads(threads or os.cpu_count() or 1)  # the pipeline's glue (scheduler, guidance) is torch
        start = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        pipe = ORTDiffusionPipeline.from_pretrained(str(export_dir), provider="CPUExecutionProvider",
                                                    session_options=options)
        seconds = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.unet
        feeds = worker_protocol.unet_inputs(int(spec["height"]) // 8, int(spec["width"]) // 8,
                                            batch=int(spec.get("unet_batch", 2)),
                                            latent_channels=int(unet.config.in_channels),
                                            text_hidden=int(unet.config.cross_attention_dim))
        # optimum's export takes one timestep for the whole batch (a scalar) and optimum casts dtypes itself;
        # shape and dtype are made to match the session here so the call times only the UNet.
        timestep_dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                          "tensor(int32)": "int32", "tensor(double)": "float64"}[unet.input_dtypes["timestep"]]
        timestep = feeds["timestep"].astype(timestep_dtype)
        feeds["timestep"] = timestep if unet.input_shapes["timestep"] else timestep[:1].reshape(())
        state.update(pipe=pipe, feeds={name: torch.from_numpy(array) for name, array in feeds.items()})
        return {"seconds": seconds}

    def pipe() -> Any:
        if "pipe" not in state:
            raise RuntimeError("no pipeline loaded: send load first")
        return state["pipe"]

    def call(request: Request) -> dict[str, Any]:
        unet = pipe().unet  # optimum's ORTUnet, called as its pipeline calls it (torch tensors in and out)
        return worker_protocol.timed_call(lambda: unet(**state["feeds"]), request, _noise_prediction)

    def generate(request: Request) -> dict[str, Any]:
        import torch

        run = pipe()
        generator = torch.Generator().manual_seed(int(request["seed"]))
        return {"seconds": worker_protocol.timed(lambda: run(
            request["prompt"], num_inference_steps=int(request["steps"]), guidance_scale=float(request["guidance"]),
            height=int(spec["height"]), width=int(spec["width"]), generator=generator, output_type="np"))}

    def info(_request: Request) -> dict[str, Any]:
        return {"versions": _versions(), "describe": "optimum ORTDiffusionPipeline on optimum's own ONNX export"}

    return {"export": export, "load": load, "call": call, "generate": generate, "info": info}


if __name__ == "__main__":
    sys.exit(worker_protocol.serve(handlers(json.loads(sys.argv[1]))))
