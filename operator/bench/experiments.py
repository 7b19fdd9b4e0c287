"""The experiments ``agentlat bench`` can run, by letter (C, the attribution, rides along with each)."""

EXPERIMENTS = {
    "A": "host as is",
    "B": "policy applied before the probe starts",
    "D": "daemon started first, then noise and probe",
}
