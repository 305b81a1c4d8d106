"""What runs inside the streaming pipeline models (`vilex_generate_stream`, `vilex_reconstruct_stream`).

A streaming model is the pipeline model it streams (`PipelineModel` in bls.py, the same checks, the same
grouping of batched requests, the same one denoising loop in vilex/pipeline.py) with a step callback. Its
config is decoupled (`model_transaction_policy { decoupled: true }`), so each request gets, through its
own response sender:

    1. one progress response per denoising step, in order: STEP (1..TOTAL_STEPS) and TOTAL_STEPS, (n, 1)
       each, and every PREVIEW_EVERY steps a PREVIEW (n, H, W, 3): the VAE decoder's image of the current
       latents (one `vae_decoder` call; exact, but it costs a decode, so previews are opt-in);
    2. one result response: IMAGE (n, H, W, 3), the same image the non-streaming model returns;
    3. an empty response with TRITONSERVER_RESPONSE_COMPLETE_FINAL.

A bad request gets a single INVALID_ARG error response with the final flag, as the non-streaming model's
400 (its message starts with STREAM_INVALID_ARG_PREFIX: a gRPC stream carries no status code).

After each progress response Triton is asked whether its request was cancelled (`request.is_cancelled()`:
the client closed its gRPC stream with cancel_requests=True, or the request timed out); both happen on a
thread of their own (ProgressSender), so the loop waits for neither. A cancelled request gets no further
response but a final CANCELLED error; a group of batched requests stops its loop at the next step once all
of them are cancelled (GenerationCancelled raised out of the loop, so nothing is decoded). The model logs
the step where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from vilex.errors import ViLexUsageError

from .bls import PipelineModel
from .interface import STREAM_INVALID_ARG_PREFIX, STREAM_MODELS, pipeline_models
from .pipeline_requests import PipelineRequest


class GenerationCancelled(Exception):
    """Every request of a group was cancelled; raised from the step callback to stop the loop."""

    def __init__(self, step: int, total: int):
        super().__init__(f"cancelled after {step} of {total} denoising steps")
        self.step, self.total = step, total


class StreamingPipelineModel(PipelineModel):
    """The logic of one streaming model; `args` is what Triton passes to `initialize`."""

    def __init__(self, model: str, args: dict, pb_utils):
        if model not in STREAM_MODELS:
            raise ValueError(f"{model!r} is not a streaming model ({', '.join(STREAM_MODELS)})")
        # The streamed model's code (its name selects tokenize-then-generate or generate alone) ...
        super().__init__(STREAM_MODELS[model], args, pb_utils)
        # ... with the streaming model's own inputs (those and PREVIEW_EVERY) and name in messages.
        self.stream_name = model
        self.served = pipeline_models(self.limits.hidden_size, self.limits.num_queries)[model]
        self.logger = pb_utils.Logger

    # ---- one call of execute(): every answer goes through the requests' response senders ------------------
    def execute(self, requests: list) -> None:
        pb = self.pb_utils
        senders = [request.get_response_sender() for request in requests]
        # 1. Check every request on its own: a bad one gets its error (and the final flag), the others run.
        checked, refused = self._check(requests, self.stream_name)
        for index, (message, code) in refused.items():
            self._finish(senders[index], message, code)
        # Requests cancelled while they waited in the queue do not start.
        for index in [i for i in checked if requests[i].is_cancelled()]:
            del checked[index]
            self._cancelled(senders[index], 0, None)
        # 2. Run them together (PipelineModel._run), streaming each step to the requests still listening. The
        #    responses go out, and the cancellation checks are made, on a thread of its own (ProgressSender).
        cancelled: dict[int, tuple[int, int]] = {}  # request index -> (steps done, total) when the loop stopped it
        progress = ProgressSender(requests, senders)
        loop_ns, steps = 0, 0  # what streaming costs the loop itself, previews apart (logged at verbose level)

        def on_step(members: list[tuple[int, int]], step_index: int, total: int, latents) -> None:
            nonlocal loop_ns, steps
            start = time.perf_counter_ns()
            listening = []
            for index in dict.fromkeys(i for i, _ in members):  # the group's requests, in order
                if index in cancelled:
                    continue
                if index in progress.cancelled:
                    cancelled[index] = (step_index + 1, total)
                else:
                    listening.append(index)
            if not listening:
                raise GenerationCancelled(step_index + 1, total)
            previews = 0
            for index in listening:
                rows = [j for j, (i, _) in enumerate(members) if i == index]  # its rows of latents (b, C, h, w)
                response, preview_ns = self._progress(checked[index], step_index + 1, total, latents[rows])
                progress.send(index, response)
                previews += preview_ns
            loop_ns, steps = loop_ns + time.perf_counter_ns() - start - previews, steps + 1

        try:
            outcomes = self._run(checked, on_step=on_step)
        finally:
            progress.close()  # every progress response is out before the result
        if steps:
            self.logger.log_verbose(
                f"{self.stream_name}: streaming took {loop_ns / steps / 1e6:.3f} ms per step in the loop over {steps} "
                f"steps, and {progress.busy_ns / steps / 1e6:.3f} ms per step on its sending thread (progress "
                f"responses and cancellation checks)")
        for index, error in progress.errors.items():
            if index in outcomes and not isinstance(outcomes[index], Exception):
                outcomes[index] = RuntimeError(f"a progress response could not be sent: {error}")
        # 3. The result, then the final flag; a cancelled request gets a final CANCELLED error instead.
        for index, outcome in outcomes.items():
            if index in cancelled or isinstance(outcome, GenerationCancelled):
                step, total = cancelled.get(index) or (outcome.step, outcome.total)
                self._cancelled(senders[index], step, total)
            elif isinstance(outcome, Exception):
                code = pb.TritonError.INVALID_ARG if isinstance(outcome, ViLexUsageError) else pb.TritonError.INTERNAL
                self._finish(senders[index], f"{self.stream_name}: {outcome}", code)
            else:
                senders[index].send(pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, np.ascontiguousarray(array)) for name, array in outcome.items()]))
                senders[index].send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None  # a decoupled model answers through its response senders only

    def _progress(self, request: PipelineRequest, step: int, total: int, latents):
        """(the progress response after `step` of `total` steps for one request whose latents are (n, C, h, w),
        nanoseconds spent making its preview)."""
        pb = self.pb_utils
        n = request.n
        tensors = [pb.Tensor("STEP", np.full((n, 1), step, dtype=np.int32)),
                   pb.Tensor("TOTAL_STEPS", np.full((n, 1), total, dtype=np.int32))]
        preview_ns = 0
        if request.preview_every and step % request.preview_every == 0:
            start = time.perf_counter_ns()
            images = self.pipeline.decode(latents)  # (n, 3, H, W) in [0, 1]
            pixels = np.round(images.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # as generate's PIL
            tensors.append(pb.Tensor("PREVIEW", np.ascontiguousarray(pixels)))  # (n, H, W, 3)
            preview_ns = time.perf_counter_ns() - start
        return pb.InferenceResponse(output_tensors=tensors), preview_ns

    def _finish(self, sender, message: str, code) -> None:
        if code == self.pb_utils.TritonError.INVALID_ARG:  # the stream loses the code: say it (interface.py)
            message = STREAM_INVALID_ARG_PREFIX + message
        sender.send(self._error(message, code), flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _cancelled(self, sender, step: int, total: int | None) -> None:
        where = f"after {step} of {total} denoising steps" if total else "before its first denoising step"
        self.logger.log_info(f"{self.stream_name}: request cancelled, stopped {where}")
        self._finish(sender, f"{self.stream_name}: cancelled {where}", self.pb_utils.TritonError.CANCELLED)


class ProgressSender:
    """Sends the progress responses of one execute() call, in order, on a thread of its own, and after each asks
    Triton whether its request was cancelled. Both are round trips to the server process (measured on 2 busy
    cores: about 7 ms per response and 1.5 ms per check), which the denoising loop then does not wait for; the
    loop reads `cancelled` instead, so it stops a step later than a check of its own would (more steps only
    if the thread falls behind the loop).

    requests, senders: the execute() call's requests and their response senders, by index."""

    def __init__(self, requests: list, senders: list):
        self.requests, self.senders = requests, senders
        self.cancelled: set[int] = set()  # requests Triton reported cancelled (written by the thread only)
        self.errors: dict[int, Exception] = {}  # requests whose progress response failed to send
        self.busy_ns = 0  # time the thread spent sending and checking
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="vilex-progress", daemon=True)
        self._thread.start()

    def send(self, index: int, response) -> None:
        self._queue.put((index, response))

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            index, response = item
            if index in self.cancelled or index in self.errors:
                continue  # nobody listens any more
            start = time.perf_counter_ns()
            try:
                self.senders[index].send(response)
                if self.requests[index].is_cancelled():
                    self.cancelled.add(index)
            except Exception as error:  # noqa: BLE001 - reported to its request by execute(), not raised here
                self.errors[index] = error
            self.busy_ns += time.perf_counter_ns() - start
