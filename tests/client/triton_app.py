"""A client app of lstm-serve's Open Inference Protocol endpoint, written with Triton's own
client (`tritonclient.grpc`) as an app would use it. Not a test module: tritonclient pins
protobuf<7 and cannot be imported beside the project's generated modules (both define
`inference.*`), so tests/client/test_tritonclient.py runs this script with the python of a
venv of its own.

It reads one JSON job on stdin and prints one JSON report on stdout:

    {"target": "host:port", "model": "basic-motions", "token": "..." (optional),
     "scenario": NAME, ...what that scenario takes}

Scenarios (each a function below, named as in the job):

- probe: health, server and model metadata, model config, readiness (of an unknown model too).
- interleaved: `sequences` [{"id": int or str, "steps": [[...]], "end": bool}] on ONE stream,
  one step per request, round robin, every request sent before any answer is awaited.
- continue: `sequence_id`, `stream_steps` started on a stream, then `unary_steps` as one
  unary infer ([1, T, I]) with `lstm_start_step`, sent twice when `resend`.
- unary: `requests` [{"sequence_id", "steps", "start", "end", "start_step"}], one infer each.
- bad_request: `sequence_id`, `steps` on a stream, one step per request, ending the sequence on
  the last; before step `bad_at` a request `bad_width` wide for the same sequence.
- unstarted: `sequence_ids` never started: one request each on a stream, then by unary infer.
- after_end: `sequence_id`, `steps` on a stream ending the sequence; once answered, one more
  request on that stream, then one by unary infer.
- reuse_after_end: pipelined on one stream, `sequence_id` `steps` ending it, one more request
  without sequence_start, then `new_steps` as a new sequence under the same id.

A response is reported as {"id", "model_name", "model_version", "parameters", "shape",
"datatype", "output"}; a refusal as {"error": message, "status": gRPC status or null (a
stream's error_message has none)}.
"""

from __future__ import annotations

import json
import sys
import threading

WAIT_S = 60.0


def run(job: dict) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=job["target"])
    app = App(client, job)
    try:
        return SCENARIOS[job["scenario"]](app, job)
    finally:
        client.close()


class App:
    def __init__(self, client, job: dict) -> None:
        self.client = client
        self.model = job.get("model", "basic-motions")
        token = job.get("token")
        self.headers = {"authorization": f"Bearer {token}"} if token else None

    def inputs(self, steps, batched: bool = False):
        import numpy as np
        import tritonclient.grpc as grpcclient

        data = np.asarray(steps, dtype=np.float32).reshape(-1, len(steps[0]))  # (T, I)
        if batched:
            data = data[None]  # (1, T, I)
        tensor = grpcclient.InferInput("INPUT", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        return [tensor]

    def outputs(self):
        import tritonclient.grpc as grpcclient

        return [grpcclient.InferRequestedOutput("OUTPUT")]

    def infer(self, request_id: str, steps, sequence_id=0, start=False, end=False, **kw) -> dict:
        """One unary infer; its report."""
        try:
            result = self.client.infer(
                self.model,
                self.inputs(steps, kw.pop("batched", False)),
                outputs=self.outputs(),
                request_id=request_id,
                sequence_id=sequence_id,
                sequence_start=start,
                sequence_end=end,
                headers=self.headers,
                **kw,
            )
        except Exception as err:
            return refusal(err)
        return answer(result)

    def stream(self, *phases: list[dict]) -> dict:
        """One stream: each phase's requests all sent before any of their answers is awaited,
        the next phase once they are all answered. The answers in the order they came, and
        the request ids sent."""
        answers = Answers()
        self.client.start_stream(callback=answers.callback, headers=self.headers)
        sent: list[str] = []
        complete = True
        try:
            for requests in phases:
                for request in requests:
                    self.client.async_stream_infer(
                        self.model,
                        self.inputs(request["steps"]),
                        outputs=self.outputs(),
                        request_id=request["id"],
                        sequence_id=request["sequence_id"],
                        sequence_start=request.get("start", False),
                        sequence_end=request.get("end", False),
                    )
                    sent.append(request["id"])
                complete = answers.wait(len(sent))
                if not complete:
                    break
        except Exception as err:  # the stream ended (refused, say): its error is in answers
            answers.send_error = refusal(err)
            complete = False
        self.client.stop_stream(cancel_requests=not complete)
        return {
            "sent": sent,
            "answers": answers.items,
            "complete": complete,
            "send_error": answers.send_error,
        }


class Answers:
    """What a stream's callback was given, in order."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.send_error: dict | None = None
        self._ended = False  # the stream itself failed: no more answers come
        self._changed = threading.Condition()

    def callback(self, result, error) -> None:
        with self._changed:
            if error is not None:
                self.items.append(refusal(error))
                self._ended |= error.status() is not None
            else:
                self.items.append(answer(result))
            self._changed.notify_all()

    def wait(self, count: int) -> bool:
        """Until `count` answers came (True), or the stream failed or WAIT_S passed (False)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.items) >= count or self._ended, WAIT_S)
            return len(self.items) >= count


def answer(result) -> dict:
    response = result.get_response()
    output = result.as_numpy("OUTPUT")
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "parameters": {
            name: getattr(value, value.WhichOneof("parameter_choice"))
            for name, value in response.parameters.items()
        },
        "shape": list(output.shape),
        "datatype": str(output.dtype),
        "output": output.tolist(),
    }


def refusal(err) -> dict:
    status = err.status() if hasattr(err, "status") else None
    message = err.message() if hasattr(err, "message") else str(err)
    return {"error": message, "status": status}


def called(function, *args, **kwargs) -> dict:
    try:
        return {"value": function(*args, **kwargs)}
    except Exception as err:
        return refusal(err)


# Scenarios


def probe(app: App, job: dict) -> dict:
    client, headers, model = app.client, app.headers, app.model
    return {
        "server_live": called(client.is_server_live, headers=headers),
        "server_ready": called(client.is_server_ready, headers=headers),
        "model_ready": called(client.is_model_ready, model, headers=headers),
        "unknown_model_ready": called(client.is_model_ready, "no-such-model", headers=headers),
        "server_metadata": called(client.get_server_metadata, headers=headers, as_json=True),
        "model_metadata": called(client.get_model_metadata, model, headers=headers, as_json=True),
        "model_config": called(client.get_model_config, model, headers=headers, as_json=True),
    }


def interleaved(app: App, job: dict) -> dict:
    sequences = job["sequences"]
    requests = []
    for step in range(max(len(s["steps"]) for s in sequences)):
        for number, sequence in enumerate(sequences):
            steps = sequence["steps"]
            if step < len(steps):
                requests.append(
                    {
                        "id": f"{number}/{step}",
                        "sequence_id": sequence["id"],
                        "steps": steps[step : step + 1],
                        "start": step == 0,
                        "end": sequence["end"] and step == len(steps) - 1,
                    }
                )
    return app.stream(requests)


def continue_(app: App, job: dict) -> dict:
    sequence_id, stream_steps = job["sequence_id"], job["stream_steps"]
    requests = [
        {"id": f"s{n}", "sequence_id": sequence_id, "steps": [row], "start": n == 0}
        for n, row in enumerate(stream_steps)
    ]
    streamed = app.stream(requests)
    unary = [
        app.infer(
            f"u{attempt}",
            job["unary_steps"],
            sequence_id,
            batched=True,
            parameters={"lstm_start_step": len(stream_steps)},
        )
        for attempt in range(2 if job.get("resend") else 1)
    ]
    return {"stream": streamed, "unary": unary}


def unary(app: App, job: dict) -> dict:
    reports = []
    for number, request in enumerate(job["requests"]):
        extra = {}
        if request.get("start_step") is not None:
            extra["parameters"] = {"lstm_start_step": request["start_step"]}
        reports.append(
            app.infer(
                request.get("id", f"u{number}"),
                request["steps"],
                request.get("sequence_id", 0),
                request.get("start", False),
                request.get("end", False),
                **extra,
            )
        )
    return {"answers": reports}


def bad_request(app: App, job: dict) -> dict:
    sequence_id, bad_at = job["sequence_id"], job["bad_at"]
    requests = one_sequence(sequence_id, job["steps"])
    bad = {"id": "bad", "sequence_id": sequence_id, "steps": [[0.5] * job["bad_width"]]}
    return app.stream([*requests[:bad_at], bad, *requests[bad_at:]])


def unstarted(app: App, job: dict) -> dict:
    row = [[0.25] * job.get("input_size", 6)]
    ids = job["sequence_ids"]
    streamed = app.stream(
        [{"id": f"s{n}", "sequence_id": i, "steps": row} for n, i in enumerate(ids)]
    )
    return {"stream": streamed, "unary": [app.infer(f"u{n}", row, i) for n, i in enumerate(ids)]}


def one_sequence(sequence_id, steps, tag: str = "s", start: bool = True) -> list[dict]:
    """Requests of one step each: the first starts the sequence, the last ends it."""
    return [
        {
            "id": f"{tag}{n}",
            "sequence_id": sequence_id,
            "steps": [row],
            "start": start and n == 0,
            "end": n == len(steps) - 1,
        }
        for n, row in enumerate(steps)
    ]


def after_end(app: App, job: dict) -> dict:
    """The sequence ended; once that is answered, one more request on the same stream, then
    one by unary infer."""
    sequence_id, steps = job["sequence_id"], job["steps"]
    again = [{"id": "again", "sequence_id": sequence_id, "steps": steps[:1]}]
    streamed = app.stream(one_sequence(sequence_id, steps), again)
    return {"stream": streamed, "unary": app.infer("later", steps[:1], sequence_id)}


def reuse_after_end(app: App, job: dict) -> dict:
    """Pipelined on one stream: a sequence that ends, a request for its id without
    sequence_start, then a new sequence under the same id (as Triton's clients reuse ids)."""
    sequence_id, steps, reused = job["sequence_id"], job["steps"], job["new_steps"]
    again = {"id": "again", "sequence_id": sequence_id, "steps": steps[:1]}
    requests = [*one_sequence(sequence_id, steps), again, *one_sequence(sequence_id, reused, "n")]
    return app.stream(requests)


SCENARIOS = {
    "probe": probe,
    "interleaved": interleaved,
    "continue": continue_,
    "unary": unary,
    "bad_request": bad_request,
    "unstarted": unstarted,
    "after_end": after_end,
    "reuse_after_end": reuse_after_end,
}


if __name__ == "__main__":
    report = run(json.load(sys.stdin))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
