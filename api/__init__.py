"""The REST API of the job service (FastAPI, versioned under `/v1`).

Routes parse requests and shape answers; what a job is and how it moves lives in `jobs/`, which
the worker shares. Start it with `hmkd serve` (embedded) or `uvicorn --factory api.app:create_app`.
"""
