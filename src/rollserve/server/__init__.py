"""HTTP front end over one engine: SGLang's native API and the OpenAI API."""
