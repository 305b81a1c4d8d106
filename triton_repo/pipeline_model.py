"""The pipeline (BLS) models: vilex_tokenize, vilex_generate, vilex_reconstruct, and with `--stream` the
decoupled vilex_generate_stream and vilex_reconstruct_stream.

`vilex triton-repo` copies this file to `<model>/1/model.py` for each of them; the model's name, which
Triton passes to `initialize`, selects what it does. Their inputs and outputs, with dtypes, shapes and
allowed values, are declared once in vilex/serving/interface.py (`pipeline_models`). The logic is vilex's:
`PipelineModel` (vilex/serving/bls.py) runs vilex's own denoising loop with each stage sent to a graph model
(or, with `--unet local`, the UNet in this process); `StreamingPipelineModel` (vilex/serving/streaming.py)
is the same with a response per denoising step. A caller's mistake is a TritonError INVALID_ARG (HTTP 400)
whose message names the input.
"""

import os
import site
import sys

# The Python backend's stub runs an isolated interpreter: it ignores PYTHONPATH and sees only the base
# installation's site-packages. `vilex serve` names the serving environment's site-packages in
# VILEX_SITE_PACKAGES: they go first (a numpy 2 in the base breaks the backend's tensors) and their .pth
# files are read (an editable install of vilex is one). Unset in an image where vilex is installed.
_SITE_PACKAGES = [path for path in os.environ.get("VILEX_SITE_PACKAGES", "").split(os.pathsep) if path]
sys.path[:0] = [path for path in _SITE_PACKAGES if path not in sys.path]
for _path in _SITE_PACKAGES:
    site.addsitedir(_path)

import triton_python_backend_utils as pb_utils  # noqa: E402 (after the path set-up above)

from vilex.serving.bls import PipelineModel  # noqa: E402
from vilex.serving.interface import STREAM_MODELS  # noqa: E402
from vilex.serving.streaming import StreamingPipelineModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        name = args["model_name"]
        self.model = (StreamingPipelineModel if name in STREAM_MODELS else PipelineModel)(name, args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
