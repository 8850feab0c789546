"""A stand-in for `python -m prefect.engine` used where a test needs many cheap runs.

It records that it ran (appends the run id to $FAKE_ENGINE_LOG), then reports
RUNNING and COMPLETED over the REST API exactly as the engine would. Standard library
only, so it starts in milliseconds.
"""

import json
import os
import time
import urllib.request
import uuid

run_id = os.environ["PREFECT__FLOW_RUN_ID"]
api = (os.environ.get("FAKE_ENGINE_API_URL") or os.environ["PREFECT_API_URL"]).rstrip("/")


def propose(state_type: str, name: str) -> None:
    body = {
        "state": {
            "type": state_type,
            "name": name,
            "state_details": {"transition_id": str(uuid.uuid4())},
        },
        "force": False,
    }
    req = urllib.request.Request(
        f"{api}/flow_runs/{run_id}/set_state",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    for _ in range(20):
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.load(resp)["status"] == "ACCEPT"
                return
        except urllib.error.HTTPError as exc:  # SQLite servers answer 503 now and then
            if exc.code != 503:
                raise
    raise SystemExit("could not report state")


if __name__ == "__main__":  # (tests/flows/vm_flows.py imports propose)
    if os.environ.get("FAKE_ENGINE_LOG"):
        with open(os.environ["FAKE_ENGINE_LOG"], "a") as f:
            f.write(run_id + "\n")
    propose("RUNNING", "Running")
    print(f"fake engine ran {run_id}", flush=True)
    time.sleep(float(os.environ.get("FAKE_ENGINE_SLEEP", "0")))
    propose("COMPLETED", "Completed")
