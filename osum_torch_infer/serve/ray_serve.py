"""N replicas of osum-serve's app behind Ray Serve (``osum-serve PKG --replicas N``; extra ``.[ray]``).

Every replica loads the package and runs exactly the app of :mod:`.app` (same endpoints, web page, dynamic
batching, limits and errors); Ray Serve's HTTP proxy spreads requests over the replicas and restarts a replica
that dies. On one machine ``osum-serve PKG --replicas 2`` starts a local Ray instance; on a Ray cluster, start
the script on the head node (``RAY_ADDRESS``) and give each replica a GPU with ``--gpus-per-replica 1``.

    osum-serve pkg/osum --replicas 2 --port 8000                 # two CPU replicas on this machine
    osum-serve pkg/osum --replicas 4 --gpus-per-replica 1        # four GPU replicas on a Ray cluster

Or from Python (the deployment is an ordinary Ray Serve application)::

    from ray import serve
    from osum_torch_infer.serve.ray_serve import application
    serve.run(application("pkg/osum", replicas=2), route_prefix="/")
"""

from __future__ import annotations

import os
from typing import Any


def application(package: str | os.PathLike, *, replicas: int = 2, cpus_per_replica: float = 1.0,
                gpus_per_replica: float = 0.0, device: str = "auto", dtype: str = "auto",
                app_kwargs: dict[str, Any] | None = None):
    """A bound Ray Serve application: ``replicas`` copies of :func:`..app.create_app` over ``package``."""
    from ray import serve

    package = os.path.abspath(os.fspath(package))
    options = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}

    @serve.deployment(name="osum", num_replicas=replicas, ray_actor_options=options)
    @serve.ingress()
    class OSUMReplica:
        def __init__(self, package: str, device: str, dtype: str, app_kwargs: dict[str, Any]):
            from ..loading import load_model

            self.model = load_model(package, device=device, dtype=dtype)
            self.app_kwargs = app_kwargs

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.model, **self.app_kwargs)

    return OSUMReplica.bind(package, device, dtype, dict(app_kwargs or {}))


def run(package: str, *, host: str, port: int, replicas: int, cpus_per_replica: float, gpus_per_replica: float,
        device: str, dtype: str, app_kwargs: dict[str, Any]) -> None:
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
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(package, replicas=replicas, cpus_per_replica=cpus_per_replica,
                          gpus_per_replica=gpus_per_replica, device=device, dtype=dtype, app_kwargs=app_kwargs),
              name="osum", route_prefix="/")
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
