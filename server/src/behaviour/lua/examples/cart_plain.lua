-- cart without apply: the handler's new state is the event.
--
-- The same cart as cart_v1.lua, written the short way: each handler returns the reply and the
-- new state (or changes the state table in place and returns only the reply). The engine
-- stores the whole new state as the turn's one event when it differs from the old one, and
-- replay simply takes the last such state. Simple, at the cost of an event as large as the
-- state on every change.

function init(key, arg)
    return { items = {}, status = "open" }
end

local function total(items)
    local sum, count = 0, 0
    for _, item in pairs(items) do
        sum += item.qty * item.price
        count += item.qty
    end
    return sum, count
end

function handle_call(msg, state, ctx)
    if msg.op == "total" then
        local sum, count = total(state.items)
        return { total = sum, count = count }
    end
    if state.status ~= "open" then
        error({ invalid = "the cart is checked out" })
    end
    if msg.op == "add" then
        if type(msg.sku) ~= "string" or type(msg.price) ~= "number" then
            error({ invalid = "add needs a sku and a price" })
        end
        local item = state.items[msg.sku] or { qty = 0, price = msg.price }
        item.qty += msg.qty or 1
        item.price = msg.price
        state.items[msg.sku] = item
        return { sku = msg.sku, qty = item.qty }, state
    elseif msg.op == "remove" then
        local item = state.items[msg.sku]
        if item == nil then
            error({ invalid = "no such item: " .. tostring(msg.sku) })
        end
        item.qty -= math.min(msg.qty or item.qty, item.qty)
        if item.qty == 0 then
            state.items[msg.sku] = nil
        end
        -- Changed in place: returning only the reply keeps the changed table as the state.
        return { sku = msg.sku, qty = item.qty }
    elseif msg.op == "checkout" then
        local sum, count = total(state.items)
        if count == 0 then
            error({ invalid = "the cart is empty" })
        end
        state.status = "checked_out"
        state.checked_out_at = ctx.now
        return { total = sum, count = count, at = ctx.now }, state
    end
    error({ invalid = "unknown op: " .. tostring(msg.op) })
end
