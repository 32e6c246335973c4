-- The mock API lives in lua/sturdy/mock/ (installed with the rock, served by
-- `sturdy mock`); the specs keep requiring it by this name.
return require "sturdy.mock"
