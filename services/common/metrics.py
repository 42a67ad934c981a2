"""Every Prometheus metric duban exports, defined once (served on the ops HTTP port's /metrics).

Labels are bounded sets (service, endpoint, outcome, level, channel): never a county code,
submission id or person, so the series count stays small whatever the load.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUEST_SECONDS = Histogram(
    "duban_request_seconds",
    "Time to answer a NATS request, by service and endpoint.",
    ["service", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SUBMISSIONS = Counter(
    "duban_submissions_total",
    "Submissions answered, by outcome (accepted, duplicate, refused) and refusal code.",
    ["outcome", "code"],
)
EVENTS_APPLIED = Counter(
    "duban_events_applied_total", "Stored events applied by a consumer of the event stream.", ["consumer"]
)
PARKED = Counter("duban_events_parked_total", "Stored events a consumer could not apply and parked.", ["consumer"])
CHECKPOINT = Gauge("duban_consumer_checkpoint", "Last stream sequence a consumer has committed.", ["consumer"])
ACTIONS = Counter("duban_actions_total", "Escalation actions recorded, by level and state.", ["level", "state"])
JUDGE_SECONDS = Histogram(
    "duban_judge_seconds",
    "Time escalation takes to judge counties (a tick judges all).",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
NOTIFICATIONS = Counter(
    "duban_notifications_total", "Notification attempts, by channel and outcome.", ["channel", "outcome"]
)
READY = Gauge("duban_ready", "1 when the service is serving, 0 while starting or stopping.", ["service"])
