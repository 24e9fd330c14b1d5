"""The HTTP side of the caption service: protocol types, errors, auth and the OpenAI spec."""
