"""The service's domain layer, shared by the API and the workers: settings, database models, the
job and stage state machines, job planning and the scheduler. It knows nothing of HTTP or Celery."""
