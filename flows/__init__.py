"""DAG wiring (Prefect flows) and the `ppd` command line."""
