"""Tuning as a service: tune jobs created over gRPC, queued on Celery/Redis (or a local worker process), run by
tuning workers (tune -> export -> publish into the model repository), and found by every serving replica's
rescan. `spec` is the job itself, `bases` the allow-list of base models, `store` the server's side of the job
registry, `work` the worker's side of a job; `celery_worker` and `local_worker` run it."""
