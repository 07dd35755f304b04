"""Provider credentials: envelope-encrypted rows of `org_integration_credentials`, decrypted on demand."""
