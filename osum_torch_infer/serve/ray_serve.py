"""N replicas of osum-serve's app behind Ray Serve (``osum-serve PKG --replicas N``; extra ``.[ray]``).

Every replica loads the package and runs exactly the app of :mod:`.app` (same endpoints, web page, dynamic
batching, limits and errors); Ray Serve's HTTP proxy spreads requests over the replicas and restarts a replica
that dies. On one machine ``osum-serve PKG --replicas 2`` starts a local Ray instance; on a Ray cluster, start
the script on the head node (``RAY_ADDRESS``). With ``--device cuda`` / ``npu`` each replica holds its own device:
one Ray GPU / ``NPU`` resource each (``--gpus-per-replica`` / ``--npus-per-replica``, a fraction to share), so Ray
sets its ``CUDA_VISIBLE_DEVICES`` / ``ASCEND_RT_VISIBLE_DEVICES`` and its ``cuda:0`` / ``npu:0`` is its own.

    osum-serve pkg/osum --replicas 2 --port 8000                 # two CPU replicas on this machine
    osum-serve pkg/osum --replicas 4 --device cuda               # four GPU replicas, one GPU each
    osum-serve pkg/osum --replicas 8 --device npu --dtype fp16 --keep-fp32 auto   # 8 Ascend NPUs, one each

Or from Python (the deployment is an ordinary Ray Serve application)::

    from ray import serve
    from osum_torch_infer.serve.ray_serve import application
    serve.run(application("pkg/osum", replicas=2), route_prefix="/")
"""

from __future__ import annotations

import os
from typing import Any


def application(package: str | os.PathLike, *, replicas: int = 2, cpus_per_replica: float = 1.0,
                gpus_per_replica: float | None = None, device: str = "auto", dtype: str = "auto",
                app_kwargs: dict[str, Any] | None = None, npus_per_replica: float | None = None,
                keep_fp32: str | None = None):
    """A bound Ray Serve application: ``replicas`` copies of :func:`..app.create_app` over ``package``.

    Each replica on ``cuda`` / ``npu`` holds its own device: it asks Ray for ``gpus_per_replica`` GPUs or
    ``npus_per_replica`` of the ``NPU`` resource (default 1; a fraction shares a device), Ray sets its
    ``CUDA_VISIBLE_DEVICES`` / ``ASCEND_RT_VISIBLE_DEVICES``, and it loads on device 0 of those
    (:func:`..devices.ray_device_options`, :func:`..devices.worker_device`). ``auto`` is resolved against the
    running Ray cluster's resources (GPUs, then NPUs, then CPU); before ``ray.init`` it stays ``auto``."""
    import ray
    from ray import serve

    from ..devices import ray_device_options

    package = os.path.abspath(os.fspath(package))
    if keep_fp32 and keep_fp32.strip().endswith(".json"):
        keep_fp32 = os.path.abspath(keep_fp32.strip())  # the replicas' working directory is not ours
    cluster = ray.cluster_resources() if ray.is_initialized() else None
    per = gpus_per_replica if str(device).startswith("cuda") or (device == "auto" and cluster and
                                                                 cluster.get("GPU")) else npus_per_replica
    device, resources = ray_device_options(device, cluster, workers=replicas, per_worker=per)
    options = {"num_cpus": cpus_per_replica, **resources}

    @serve.deployment(name="osum", num_replicas=replicas, ray_actor_options=options)
    @serve.ingress()
    class OSUMReplica:
        def __init__(self, package: str, device: str, dtype: str, app_kwargs: dict[str, Any],
                     keep_fp32: str | None = None):
            import logging

            import ray

            from ..devices import worker_device
            from ..loading import load_model

            dev, why = worker_device(device, ray.get_runtime_context().get_accelerator_ids(), dict(os.environ))
            self.model = load_model(package, device=dev, dtype=dtype, keep_fp32=keep_fp32)
            if why:
                self.model.device_reason = why
            logging.getLogger("osum_torch_infer").warning("osum-serve replica: %s, %s (%s)", self.model.device,
                                                          str(self.model.dtype).replace("torch.", ""),
                                                          self.model.device_reason)
            self.app_kwargs = app_kwargs

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.model, **self.app_kwargs)

    return OSUMReplica.bind(package, device, dtype, dict(app_kwargs or {}), keep_fp32)


def run(package: str, *, host: str, port: int, replicas: int, cpus_per_replica: float,
        gpus_per_replica: float | None, device: str, dtype: str, app_kwargs: dict[str, Any],
        npus_per_replica: float | None = None, keep_fp32: str | None = None) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, deploy, and block until interrupted."""
    import signal
    import time

    import ray
    from ray import serve

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(replicas * cpus_per_replica)),
                     object_store_memory=256 << 20)
    try:  # the devices checked against the cluster before anything is deployed
        app = application(package, replicas=replicas, cpus_per_replica=cpus_per_replica,
                          gpus_per_replica=gpus_per_replica, npus_per_replica=npus_per_replica, device=device,
                          dtype=dtype, app_kwargs=app_kwargs, keep_fp32=keep_fp32)
    except ValueError:
        ray.shutdown()
        raise
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="osum", route_prefix="/")
    print(f"osum-serve: {replicas} Ray Serve replicas of {package}; http://{host}:{port}", flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: shut the replicas and local Ray down too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
