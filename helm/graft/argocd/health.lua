-- Argo CD health of Graft resources (FineTuneJob, OptimizeJob, AdapterBundle).
-- The conditions are the truth; a status computed for an older generation is not trusted.
local hs = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function current(condition, generation)
  if condition == nil then
    return false
  end
  if condition.observedGeneration ~= nil and generation ~= nil then
    return condition.observedGeneration >= generation
  end
  return true
end

local function is_true(condition, generation)
  return current(condition, generation) and condition.status == "True"
end

local function say(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end

local generation = obj.metadata.generation
local status = obj.status

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Graft operator"
  return hs
end

if status.observedGeneration ~= nil and generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = status.conditions
local validated = find_condition(conditions, "Validated")
local failed = find_condition(conditions, "Failed")
local suspended = find_condition(conditions, "Suspended")
local done_type = "Succeeded"
if obj.kind == "AdapterBundle" then
  done_type = "Ready"
end
local done = find_condition(conditions, done_type)

if current(validated, generation) and validated.status == "False" then
  hs.status = "Degraded"
  hs.message = say(validated, "The spec is invalid")
  return hs
end
if is_true(failed, generation) then
  hs.status = "Degraded"
  hs.message = say(failed, "Failed")
  return hs
end
if is_true(done, generation) then
  hs.status = "Healthy"
  hs.message = say(done, done_type)
  return hs
end
if is_true(suspended, generation) then
  hs.status = "Suspended"
  hs.message = say(suspended, "Suspended")
  return hs
end

hs.status = "Progressing"
local progress = status.progress
if progress ~= nil and progress.percent ~= nil then
  hs.message = "Training: " .. progress.percent .. "%"
else
  local running = find_condition(conditions, "Running")
  hs.message = say(running, say(done, "Waiting"))
end
return hs
