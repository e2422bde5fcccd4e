"""The OpenVINO target: the verified ONNX converted to OpenVINO IR (model.xml + model.bin), loaded back in OpenVINO on
this CPU at f32 inference precision (so the check is of the file, not of a bf16 kernel choice) and verified against
PyTorch under the tolerance policy, with metadata.json beside it. model.onnx stays in the directory: it is the IR's
source and the reference `bench --backend openvino` checks the IR against."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from craft_deploy.artifacts import atomic_write_json
from craft_deploy.export.targets.base import ExportJob, register_target
from craft_deploy.export.targets.onnx_model import onnx_record, verified_onnx
from craft_deploy.runtimes.metadata import export_metadata
from craft_deploy.runtimes.openvino_runtime import import_openvino
from craft_deploy.runtimes.tolerance import compare_outputs, judge_export

FILE = "model.xml"


def _check_openvino() -> None:
    import_openvino("--format openvino")


@register_target(
    "openvino",
    artifact=FILE,
    feeds="xml",
    help="openvino (OpenVINO IR, model.xml + model.bin, from the verified ONNX; verified in OpenVINO on this CPU)",
    precheck=_check_openvino,
    flavours=None,  # OpenVINO runs S8S8 and U8S8 Q/DQ alike, wherever the placement put them
)
def export(job: ExportJob) -> dict[str, Any]:
    """The verified model.onnx, its IR (weights kept at their precision: no FP16 compression), verified."""
    ov = import_openvino("--format openvino")
    onnx_file = verified_onnx(job)
    t0 = time.perf_counter()
    model = ov.convert_model(str(onnx_file.path))
    xml = job.stage / FILE  # the staging directory is renamed into place only once everything checks out
    ov.save_model(model, str(xml), compress_to_fp16=False)
    convert_seconds = time.perf_counter() - t0
    atomic_write_json(job.stage / "metadata.json", {**export_metadata(job.bundle.manifest), "openvino": ov.__version__})
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    got = []
    for chunk in job.images.split(32):  # the IR keeps the ONNX's dynamic batch dimension
        request.infer({0: chunk.numpy()})
        got.append(request.get_output_tensor(0).data.copy())
    got = np.concatenate(got)
    check = compare_outputs(job.ref, got)
    check["passed"] = judge_export(check, job.plan.precision, job.cfg.atol, job.bundle.model, job.images, job.ref, got)
    check["inference_precision"] = "f32"
    onnx_file.verification["openvino"] = check
    onnx_file.timings["openvino_convert_seconds"] = convert_seconds
    onnx_file.extra["openvino"] = {"version": ov.__version__, "ir_bin_bytes": xml.with_suffix(".bin").stat().st_size}
    onnx_file.extra["size_bytes"] = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size  # the IR: both files
    return onnx_record(job, onnx_file, xml)
