"""api-grpc through a client nobody here wrote: Python grpcio, with stubs generated at run time
from api-grpc/proto, and grpcio-reflection's v1alpha client. Run by the Rust test
worker/tests/grpc_python.rs against a real pipeline (api-grpc, relay, worker), so WatchTask
sees a task the worker completed.

Usage: client.py --target HOST:PORT --key API_KEY --proto DIR
Prints one line per check; exits 1 on the first failure.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import uuid

import grpc
import grpc_tools
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

SERVICE = "kafkify.task.v1.TaskService"


def stubs(proto_root):
    out = tempfile.mkdtemp(prefix="kafkify-grpc-python-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "kafkify/task/v1/task.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("kafkify.task.v1.task_pb2")
    rpc = importlib.import_module("kafkify.task.v1.task_pb2_grpc")
    return pb, rpc


def expect_code(what, code, call):
    try:
        call()
    except grpc.RpcError as e:
        if e.code() != code:
            sys.exit(f"FAIL {what}: {e.code()} ({e.details()}), wanted {code}")
        print(f"ok   {what}: {code.name}")
        return
    sys.exit(f"FAIL {what}: succeeded, wanted {code}")


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--target", required=True)
    args.add_argument("--key", required=True)
    args.add_argument("--proto", required=True)
    a = args.parse_args()
    pb, rpc = stubs(a.proto)
    channel = grpc.insecure_channel(a.target)
    auth = [("authorization", f"Bearer {a.key}")]
    tasks = rpc.TaskServiceStub(channel)

    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING, status
    print("ok   health: SERVING")

    # Reflection as Python's own client speaks it (v1alpha): the service and its methods.
    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in db.get_services(), db.get_services()
    methods = sorted(m.name for m in DescriptorPool(db).FindServiceByName(SERVICE).methods)
    assert methods == ["GetTaskStatus", "ListTasks", "ProcessTask", "WatchTask"], methods
    print(f"ok   reflection v1alpha: {SERVICE} {methods}")

    expect_code(
        "no key",
        grpc.StatusCode.UNAUTHENTICATED,
        lambda: tasks.GetTaskStatus(pb.GetTaskStatusRequest(id=str(uuid.uuid4()))),
    )

    # ProcessTask, then WatchTask until the worker's result arrives.
    task = tasks.ProcessTask(
        pb.ProcessTaskRequest(type="echo", input='{"from": "python"}'), metadata=auth
    )
    assert task.status == pb.TASK_STATUS_PENDING, task
    seen = [t.status for t in tasks.WatchTask(pb.WatchTaskRequest(id=task.id), metadata=auth, timeout=60)]
    assert seen[0] == pb.TASK_STATUS_PENDING and seen[-1] == pb.TASK_STATUS_COMPLETED, seen
    done = tasks.GetTaskStatus(pb.GetTaskStatusRequest(id=task.id), metadata=auth)
    assert done.HasField("result") and json.loads(done.result) == {"from": "python"}, done
    assert done.HasField("completed_at"), done
    print(f"ok   ProcessTask + WatchTask: {[pb.TaskStatus.Name(s) for s in seen]}, result {done.result}")

    # Idempotency keys.
    key = f"py-{uuid.uuid4()}"
    first = tasks.ProcessTask(pb.ProcessTaskRequest(type="echo", input="1", idempotency_key=key), metadata=auth)
    again = tasks.ProcessTask(pb.ProcessTaskRequest(type="echo", input="1", idempotency_key=key), metadata=auth)
    assert first.id == again.id, (first, again)
    print("ok   idempotency key: the retry returns the first task")
    expect_code(
        "key reused with another input",
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: tasks.ProcessTask(pb.ProcessTaskRequest(type="echo", input="2", idempotency_key=key), metadata=auth),
    )
    expect_code(
        "bad type",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: tasks.ProcessTask(pb.ProcessTaskRequest(type="Not A Type!", input="1"), metadata=auth),
    )
    expect_code(
        "input not JSON",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: tasks.ProcessTask(pb.ProcessTaskRequest(type="echo", input="{nope"), metadata=auth),
    )
    expect_code(
        "unknown task",
        grpc.StatusCode.NOT_FOUND,
        lambda: tasks.GetTaskStatus(pb.GetTaskStatusRequest(id=str(uuid.uuid4())), metadata=auth),
    )
    expect_code(
        "id not a UUID",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: tasks.GetTaskStatus(pb.GetTaskStatusRequest(id="nope"), metadata=auth),
    )

    # ListTasks: every task once, oldest first, two at a time.
    made = [
        tasks.ProcessTask(pb.ProcessTaskRequest(type="echo", input=str(i)), metadata=auth).id
        for i in range(5)
    ]
    listed, token, pages = [], "", 0
    while True:
        page = tasks.ListTasks(pb.ListTasksRequest(page_size=2, page_token=token), metadata=auth)
        assert len(page.tasks) <= 2, page
        listed += [t.id for t in page.tasks]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == len(set(listed)), "a task listed twice"
    positions = [listed.index(i) for i in made]
    assert positions == sorted(positions), "not oldest first"
    print(f"ok   ListTasks: {len(listed)} tasks in {pages} pages of 2, each once, oldest first")
    first_page = tasks.ListTasks(pb.ListTasksRequest(page_size=1), metadata=auth)
    expect_code(
        "page token of another status filter",
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: tasks.ListTasks(
            pb.ListTasksRequest(page_size=1, page_token=first_page.next_page_token, status=pb.TASK_STATUS_FAILED),
            metadata=auth,
        ),
    )
    expect_code(
        "malformed page token",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: tasks.ListTasks(pb.ListTasksRequest(page_token="!!"), metadata=auth),
    )
    expect_code(
        "page size over 200",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: tasks.ListTasks(pb.ListTasksRequest(page_size=201), metadata=auth),
    )
    print("all checks passed")


if __name__ == "__main__":
    main()
