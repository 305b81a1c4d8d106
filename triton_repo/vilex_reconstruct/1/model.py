"""vilex_reconstruct: images -> ViLex tokens -> images, chaining all four graph models.

Inputs (n images per request). Declared once, with their dtypes, shapes and allowed values, in
vilex/serving/interface.py (`pipeline_models`, `GENERATION_OPTIONS`); each optional per-image value
(n, 1) is an argument of ViLexPipeline.generate, and absent means the library's default:
    IMAGE           TYPE_STRING (n, 1)       encoded image bytes (PNG, JPEG, WebP, ...)  } exactly one
    IMAGE_RGB       TYPE_UINT8  (n, H, W, 3) raw RGB pixels                            } of the two
    NUM_TOKENS, PROMPT, NEGATIVE_PROMPT, STEPS, GUIDANCE, TEXT_GUIDANCE, ORDER, HEIGHT, WIDTH, SEED
Output:
    IMAGE           TYPE_UINT8  (n, H, W, 3)

The loop is vilex's own (ViLexPipeline.generate) over a BLS stage backend: vilex/serving/bls.py.
A caller's mistake is a TritonError INVALID_ARG (HTTP 400) whose message names the input.
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


class TritonPythonModel:
    def initialize(self, args):
        self.model = PipelineModel("vilex_reconstruct", args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
