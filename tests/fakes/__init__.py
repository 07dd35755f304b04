"""Small real servers speaking the documented protocols of services we cannot run here."""
