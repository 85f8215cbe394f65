"""The generic decoder core: session state, token loop, spans, directives, hooks, discovery."""
