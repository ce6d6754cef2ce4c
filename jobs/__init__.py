"""The service's domain, shared by the API and the workers: job spec, ORM models, the job
state machine and lease protocol, the artifact store, settings. Imports no api/ or worker/."""
