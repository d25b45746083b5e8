"""The OpenAI-compatible server (`ocula serve`, docs/serving.md).

Modules: `protocol` (request / response schemas), `security` (media URL policy), `chat` (OpenAI messages ->
prompt ids + media items through the model's processor), `responses` (engine outputs -> completions and
SSE chunks), `metrics` (Prometheus text), `app` (FastAPI routes, errors, disconnects). Importing this
package imports nothing else.
"""
