"""The model microservice of the deployment repository: serves one pinned MLflow model version."""
