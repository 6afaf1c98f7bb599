"""The HTTP routes, one ``APIRouter`` per area: openai (models, completions, chat), files, jobs,
playground."""
