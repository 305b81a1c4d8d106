"""A Python-backend model that runs one exported ONNX graph in onnxruntime (CPU).

`vilex triton-repo --platform python-ort` copies this file to `<graph>/1/model.py` for each of
`vilex_encoder`, `text_encoder`, `unet` and `vae_decoder`, next to the graph as `1/model.onnx`. It is
what Triton's onnxruntime backend would do, for the server in nvidia-pytriton, which has only the Python
backend. Names, dtypes and dims are in config.pbtxt (generated from the export contract), and Triton
checks requests against them before they get here.

It needs numpy and onnxruntime only, not vilex (which imports torch): four graph processes stay light.
"""

import os
import site
import sys

# The Python backend's stub runs an isolated interpreter: it ignores PYTHONPATH and sees only the base
# installation's site-packages. `vilex serve` names the serving environment's site-packages in
# VILEX_SITE_PACKAGES: they go first (a numpy 2 in the base breaks the backend's tensors) and their .pth
# files are read. Unset in an image where numpy and onnxruntime are installed.
_SITE_PACKAGES = [path for path in os.environ.get("VILEX_SITE_PACKAGES", "").split(os.pathsep) if path]
sys.path[:0] = [path for path in _SITE_PACKAGES if path not in sys.path]
for _path in _SITE_PACKAGES:
    site.addsitedir(_path)

import json  # noqa: E402 (after the path set-up above)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        graph = Path(args["model_repository"]) / args["model_version"] / parameters["graph_file"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
        # The four graph models run one after another in separate processes: an idle session's threads
        # spinning for work (onnxruntime's default) would take the cores the next stage is running on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # Dynamic batching hands over several requests at once. Those whose inputs agree in every axis but
        # the first (the batch axis of every graph) run as one onnxruntime call; outputs are split back.
        feeds = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                 for request in requests]
        groups = {}
        for index, feed in enumerate(feeds):
            groups.setdefault(tuple(feed[name].shape[1:] for name in self.input_names), []).append(index)
        responses = [None] * len(requests)
        for indices in groups.values():
            sizes = [feeds[i][self.input_names[0]].shape[0] for i in indices]
            batch = {name: np.concatenate([feeds[i][name] for i in indices]) for name in self.input_names}
            try:
                outputs = self.session.run(self.output_names, batch)
            except Exception as error:  # noqa: BLE001 - onnxruntime's errors have no common base; reported per request
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.name}: onnxruntime failed: {error}"))
                continue
            starts = np.cumsum([0] + sizes)
            for j, i in enumerate(indices):
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(output[starts[j]:starts[j + 1]]))
                    for name, output in zip(self.output_names, outputs)])
        return responses
