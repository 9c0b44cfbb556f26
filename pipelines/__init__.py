"""Pipeline definitions and the names of the cluster objects they run against."""
