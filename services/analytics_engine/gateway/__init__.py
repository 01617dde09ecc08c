"""API Gateway: the platform's only external HTTP interface (REST under `/api/v1`, Server-Sent
Events for live KPI values, an OpenAPI document with a docs page) and the live Demo UI at `/`."""
