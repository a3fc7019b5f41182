"""The project's thin guard around FastChat's OpenAI API server.

Logic only (no FastChat import at module load): `errors` (the OpenAI error schema and FastChat
code -> HTTP status), `validate` (request checks FastChat lacks), `context` (one object per
request: slot accounting for the per-worker queue limit, timings for /metrics, the access log),
`controller_client` (drop a dead worker from the controller). The binding to FastChat's module
lives in launch/fastchat_patches/api_*.py and controller_*.py.
"""
