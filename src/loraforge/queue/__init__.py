"""Celery glue only: the app, thin tasks that take ids, and the dispatcher the API uses."""
