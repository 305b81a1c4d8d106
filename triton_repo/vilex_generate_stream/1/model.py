"""vilex_generate_stream: ViLex tokens (+ text) -> images, streaming progress (a decoupled model, served over gRPC streaming).

Inputs: the inputs of vilex_generate (declared once in vilex/serving/interface.py, `pipeline_models`), and
    PREVIEW_EVERY   TYPE_INT32  (n, 1)  a PREVIEW every k steps, 1..max_steps (default: none)
Responses, per request, in this order (STREAM_OUTPUTS in interface.py):
    one per denoising step  STEP, TOTAL_STEPS  TYPE_INT32 (n, 1) [+ PREVIEW TYPE_UINT8 (n, H, W, 3)]
    the result              IMAGE              TYPE_UINT8 (n, H, W, 3), as vilex_generate returns it
    an empty response with the final flag

The loop is vilex's own (ViLexPipeline.generate) with a step callback: vilex/serving/streaming.py. A
caller's mistake is one TritonError INVALID_ARG response naming the input; a cancelled request stops at
the next step.
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

from vilex.serving.streaming import StreamingPipelineModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.model = StreamingPipelineModel("vilex_generate_stream", args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
