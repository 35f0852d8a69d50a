"""Celery workers and the dispatcher: adapters from w2s stages to Celery and the database."""
