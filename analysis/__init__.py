"""Tables, plots and the report of a study, read from its MLflow experiment."""
