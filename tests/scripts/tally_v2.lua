-- tally, version 2: the same counter kept as { count = N, shape = 2 }.
function init(key, arg)
    return { count = 0, shape = 2 }
end

function migrate(from_version, state)
    if from_version ~= 1 then
        error("tally v2 cannot migrate from version " .. tostring(from_version))
    end
    return { count = state.n, shape = 2 }
end

function handle_call(msg, state, ctx)
    if msg.op == "incr" then
        ctx.emit({ by = 1 })
        return { version = 2, value = state.count + 1 }
    elseif msg.op == "get" then
        return { version = 2, value = state.count }
    end
    error({ invalid = "unknown op: " .. tostring(msg.op) })
end

function apply(state, event)
    state.count += event.by
    return state
end
