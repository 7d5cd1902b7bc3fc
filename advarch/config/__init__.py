"""Config helpers: validation against constructors, resolvers and run-directory utilities."""
