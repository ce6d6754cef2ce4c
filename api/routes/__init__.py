"""One router per resource: jobs, artifacts, queue, health."""
