"""The tool service: CRM, knowledge-base RAG and billing tools behind an immutable registry."""
